"""hydra-optuna-sweeper with a study that an interrupted or repeated search continues.

Hydra only instantiates sweepers found in the `hydra_plugins` namespace, hence this package. It changes three
things of the stock `OptunaSweeper` (conf/hparams_search/ selects it through `hydra.sweeper._target_`):

* `n_trials` is the study's total, not "this many more": rerunning the same command after an interruption runs
  only the trials still missing (finished = complete, failed or pruned; a trial left running by a killed process
  is not counted and its place is taken by a new one), and rerunning a finished search just reports its best.
* Job numbers continue after the study's trials (job N runs trial N), so a rerun's job folders never collide
  with earlier ones.
* A rerun reseeds the sampler: a seeded sampler would otherwise replay the draws of the first run, and the
  continued study would repeat its first trials.
* The folder of a `sqlite:///path` storage is created first (SQLite cannot create it).

Without hydra-optuna-sweeper installed this module defines nothing, so Hydra's plugin scan stays silent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List

log = logging.getLogger(__name__)
# optuna's SQLite storage loads alembic, whose INFO lines ("setup plugin ...") would fill the sweep's console.
logging.getLogger("alembic").setLevel(logging.WARNING)

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # the `hpo` extra is not installed
    OptunaSweeper = None


def sqlite_path(storage) -> Path | None:
    url = str(storage or "")
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def finished_trials(storage, study_name: str | None) -> tuple[int, int]:
    """(finished trials, all trials) of an existing study; (0, 0) when there is none yet."""
    import optuna
    from optuna.trial import TrialState

    if storage is None or study_name is None:
        return 0, 0
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no such study yet
        return 0, 0
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)]
    return len(done), len(trials)


if OptunaSweeper is not None:

    class ResumableOptunaSweeper(OptunaSweeper):
        """OptunaSweeper whose n_trials counts the trials already in a persistent study (see the module doc)."""

        def sweep(self, arguments: List[str]) -> None:
            impl = self.sweeper
            path = sqlite_path(impl.storage)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            done, existing = finished_trials(impl.storage, impl.study_name)
            if existing:
                remaining = max(0, int(impl.n_trials) - done)
                log.info("Study %s has %d finished trial(s) of n_trials=%d: running %d more.", impl.study_name,
                         done, impl.n_trials, remaining)
                impl.n_trials = remaining
                impl.job_idx = existing
                if hasattr(impl.sampler, "reseed_rng"):
                    impl.sampler.reseed_rng()
            return super().sweep(arguments)
