"""A Hydra sweeper on Optuna's ask-and-tell API (Optuna >= 4): `hydra/sweeper=ldm_optuna`.

Why not hydra-optuna-sweeper: its stable release needs optuna 2 (so installing it downgrades a current optuna and
rules out optuna-dashboard), and its 1.4 release candidate needs hydra-core 1.4, itself only a pre-release. This
sweeper keeps what users of that plugin write and get:

* the search space in `hydra.sweeper.params` with Hydra's sweep syntax (search_space.py);
* Hydra's launchers and sweep dirs: each batch of `n_jobs` asked trials is one `launcher.launch(...)` call, as
  Hydra's basic sweeper does, so `hydra/launcher=parallel|local|slurm` work unchanged;
* `optimization_results.yaml` (best value and parameters) in the sweep dir.

and adds:

* A persistent study continues: `n_trials` is the study's total, not "this many more". Rerunning the same command
  after an interruption runs only the trials still missing (finished = complete, failed or pruned; a trial left
  running by a killed process is not counted and its place is taken by a new one); rerunning a finished search
  reports its best.
* Job numbers are trial numbers (job N runs trial N), so a rerun's job folders never collide with earlier ones.
* A rerun reseeds the sampler (seed + trials so far): the same seed would replay the first run's draws.
* Pruning: with a `pruner`, each job gets its trial's id (LDM_USERS_OPTUNA_TRIAL_ID, through Hydra's
  `hydra.job.env_set`) and reports its loss to it (ldm_users.hpo); a job the pruner stops returns `hpo.PRUNED` and
  is told to the study as pruned.
* The folder of a `sqlite:///path` storage is created first (SQLite cannot create it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.ldm_users_optuna import search_space

log = logging.getLogger(__name__)
# optuna's SQLite storage loads alembic, whose INFO lines ("setup plugin ...") would fill the sweep's console.
logging.getLogger("alembic").setLevel(logging.WARNING)

TRIAL_ENV = "LDM_USERS_OPTUNA_TRIAL_ID"  # the job's trial, for reporting to it (ldm_users.hpo)
PRUNED = "pruned"  # what a job returns when its trial was pruned


@dataclass
class LdmOptunaSweeperConf:
    _target_: str = "hydra_plugins.ldm_users_optuna.LdmOptunaSweeper"
    _recursive_: bool = False  # the sweeper builds the sampler and pruner itself, after checking optuna is there
    study_name: Optional[str] = None
    storage: Optional[str] = None  # e.g. sqlite:///outputs/hpo/study/optuna.db; None: in memory, no resume
    direction: str = "minimize"
    n_trials: int = 20
    n_jobs: int = 1  # trials asked and launched at once
    sampler: Any = None  # a `_target_` config (default: Optuna's TPESampler)
    pruner: Any = None  # a `_target_` config, e.g. optuna.pruners.MedianPruner; None: no pruning
    params: Any = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="ldm_optuna", node=LdmOptunaSweeperConf,
                             provider="ldm_users")


def sqlite_path(storage) -> Path | None:
    url = str(storage or "")
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def _optuna():
    try:
        import optuna
    except ImportError as err:
        raise ImportError('hydra/sweeper=ldm_optuna needs optuna: pip install "ldm-users[hpo]"') from err
    return optuna


def make_sampler(config, trials_so_far: int):
    """The configured sampler; on a continued study its seed moves on by the trials so far (a fresh draw)."""
    optuna = _optuna()
    if not config:
        return optuna.samplers.TPESampler(seed=None)
    config = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    if trials_so_far and config.get("seed") is not None:
        config["seed"] = int(config["seed"]) + trials_so_far
    return instantiate(config)


def finished_trials(study) -> int:
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return sum(t.state in done for t in study.get_trials(deepcopy=False))


class LdmOptunaSweeper(Sweeper):
    def __init__(self, study_name=None, storage=None, direction="minimize", n_trials=20, n_jobs=1, sampler=None,
                 pruner=None, params=None):
        self.study_name, self.storage, self.direction = study_name, storage, str(direction)
        self.n_trials, self.n_jobs = int(n_trials), max(1, int(n_jobs))
        self.sampler_config, self.pruner_config = sampler, pruner
        self.params = params or {}
        self.config = self.launcher = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def _trial_overrides(self, trial, fixed: dict) -> list[str]:
        overrides = [f"{key}={value}" for key, value in {**trial.params, **fixed}.items()]
        if self.pruner_config:  # the job reports to its trial (Optuna has no public trial id; its own integrations
            overrides.append(f"++hydra.job.env_set.{TRIAL_ENV}={trial._trial_id}")  # use this one too)
        return overrides

    def _tell(self, study, trial, job_return) -> None:
        """Record a job's outcome; a job that raised or returned no number is a failed trial."""
        from optuna.trial import TrialState

        try:
            value = job_return.return_value  # raises the job's exception, if it had one
        except Exception as err:  # noqa: BLE001 - the study goes on; Hydra's callbacks report the job
            log.warning("trial %d failed: %s", trial.number, err)
            study.tell(trial, state=TrialState.FAIL)
            return
        if value == PRUNED:
            study.tell(trial, state=TrialState.PRUNED)
            return
        try:
            study.tell(trial, float(value))
        except (TypeError, ValueError) as err:
            log.warning("trial %d returned %r, not a number (%s): recorded as failed.", trial.number, value, err)
            study.tell(trial, state=TrialState.FAIL)

    def sweep(self, arguments: list[str]) -> None:
        optuna = _optuna()
        path = sqlite_path(self.storage)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        space, fixed = search_space.parse([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        try:
            earlier = optuna.load_study(study_name=self.study_name, storage=self.storage) if self.storage else None
        except KeyError:  # no such study yet
            earlier = None
        existing = len(earlier.get_trials(deepcopy=False)) if earlier else 0
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, direction=self.direction,
                                    sampler=make_sampler(self.sampler_config, existing), load_if_exists=True)
        remaining = max(0, self.n_trials - finished_trials(study))
        if existing:
            log.info("Study %s has %d finished trial(s) of n_trials=%d: running %d more.", study.study_name,
                     finished_trials(study), self.n_trials, remaining)
        log.info("Study %s (%s, %s) over %s", study.study_name, self.storage or "in memory", self.direction,
                 ", ".join(space) or "no search space")
        while remaining > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, remaining))]
            returns = self.launcher.launch([self._trial_overrides(trial, fixed) for trial in trials],
                                           initial_job_idx=trials[0].number)
            for trial, job_return in zip(trials, returns):
                self._tell(study, trial, job_return)
            remaining -= len(trials)
        self._report(study)

    def _report(self, study) -> None:
        from optuna.trial import TrialState

        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if not math.isnan(t.value)]
        if not complete:
            log.warning("Study %s has no complete trial yet: no best value.", study.study_name)
            return
        best = study.best_trial
        log.info("Best value: %.3g (trial %d)", best.value, best.number)
        log.info("Best parameters: %s", ", ".join(f"{k}={_short(v)}" for k, v in best.params.items()))
        OmegaConf.save(OmegaConf.create({"name": "optuna", "study_name": study.study_name, "best_trial": best.number,
                                         "best_value": best.value, "best_params": best.params}),
                       Path(str(self.config.hydra.sweep.dir)) / "optimization_results.yaml")


def _short(value):
    return f"{value:.3g}" if isinstance(value, float) else value
