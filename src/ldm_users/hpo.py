"""The number a hyperparameter search optimises: what `ldm-train`'s Hydra main returns.

An optimising sweeper (`hydra/sweeper=ldm_optuna`, set by `hparams_search=...`) launches ldm-train jobs and reads
each job's return value as its objective. The objective is the run-summary key `hpo.metric` (e.g.
`ldm/loss_smoothed`, or `eval/user_acc/top1` with `eval.enabled=true`), optimised in `hpo.direction`
(minimize | maximize).

A trial whose training failed returns the worst value for the direction (+inf when minimising, -inf when
maximising). That is a value the Optuna sweeper accepts: the study records the trial as complete but never best,
TPE learns to avoid its region, and the next trial starts (optuna refuses a NaN). The job's own status.json and
W&B run still say failed, and the sweep exits 1 at the end as for any failed job.

Pruning: when the search has a pruner, the sweeper gives each job its trial's id in LDM_USERS_OPTUNA_TRIAL_ID, and
`trial_reporter` wraps the job's tracker so that every logged loss also goes to the trial, smoothed as the
objective is (`<stage>/loss_smoothed`: the mean of the last SMOOTH_WINDOW logged losses). When the pruner says
stop, the stage ends with `Pruned`; ldm-train ends the job cleanly (no export, no evaluation, status ok) and
returns PRUNED, which the sweeper tells the study. An `eval/...` objective has no value before the end: such a
search prunes nothing. Neither does a job of several processes (the ranks would have to agree on when to stop).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from omegaconf import DictConfig

from hydra_plugins.ldm_users_optuna import PRUNED, TRIAL_ENV
from ldm_users import runtime
from ldm_users.errors import ConfigError
from ldm_users.tracking.summary import SMOOTH_WINDOW

log = logging.getLogger("ldm_users.hpo")

DIRECTIONS = ("minimize", "maximize")


class Pruned(Exception):
    """The search's pruner stopped this trial at `step` (its smoothed loss was `value`)."""

    def __init__(self, step: int, value: float):
        super().__init__(f"pruned at step {step} (smoothed loss {value:.3g})")
        self.step, self.value = step, value


def _settings(cfg: DictConfig) -> tuple[str | None, str]:
    hpo = cfg.get("hpo") or {}
    metric = hpo.get("metric")
    direction = str(hpo.get("direction", "minimize"))
    if direction not in DIRECTIONS:
        raise ConfigError(f"hpo.direction={direction}: use hpo.direction=minimize or hpo.direction=maximize.")
    return (str(metric) if metric else None), direction


def is_optimizing() -> bool:
    """True in a sweep whose sweeper reads the jobs' return values (Optuna, Nevergrad, Ax), not a plain grid."""
    sweeper = runtime.choice("hydra/sweeper")
    return runtime.is_multirun() and sweeper not in (None, "basic")


def check(cfg: DictConfig) -> None:
    """Before any training: an objective this job cannot produce is an error now, not after hours of training."""
    metric, _ = _settings(cfg)
    if not is_optimizing():
        return
    if metric is None:
        raise ConfigError("an optimising sweep needs an objective: set hpo.metric "
                          "(e.g. hpo.metric=ldm/loss_smoothed).")
    if str(cfg.stage) == "vae":
        raise ConfigError(f"hpo.metric={metric} comes from the LDM stage, but stage=vae: use stage=all or stage=ldm.")
    if metric.startswith("eval/") and not (cfg.get("eval") and cfg.eval.get("enabled", False)):
        raise ConfigError(f"hpo.metric={metric} is an evaluation metric: add eval.enabled=true.")


def worst(direction: str) -> float:
    return math.inf if direction == "minimize" else -math.inf


def objective(cfg: DictConfig, result: Any) -> float | str | None:
    """The job's objective from `run()`'s result; the worst value for a failed job (result None), PRUNED for a
    pruned one.

    Outside an optimising sweep a missing metric is no error (stage=vae has no loss to return): None.
    """
    metric, direction = _settings(cfg)
    if metric is None:
        return None
    if result is not None and result.get("pruned") is not None:
        return PRUNED
    if result is None:
        if is_optimizing():
            log.warning("hpo: this trial failed; its objective %s is reported as %s (the worst for %s) so the "
                        "study goes on.", metric, worst(direction), direction)
        return worst(direction)
    summary = (result or {}).get("summary") or {}
    value = summary.get(metric)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        if not is_optimizing():
            return None
        numeric = sorted(k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise ConfigError(f"hpo.metric={metric} is not a number in this run's summary ({value!r}); numeric keys: "
                          f"{', '.join(numeric) or '(none)'}.")
    value = float(value)
    if math.isnan(value):
        log.warning("hpo: %s is NaN; reported as %s (the worst for %s).", metric, worst(direction), direction)
        return worst(direction)
    if is_optimizing():
        log.info("hpo: objective %s = %.3g (%s)", metric, value, direction)
    return value


class TrialReporter:
    """The job's tracker, also reporting the smoothed `key` to an Optuna trial; raises Pruned when it should stop."""

    def __init__(self, tracker, trial, key: str):
        self._tracker, self._trial, self._key = tracker, trial, key
        self._values: list[float] = []

    def __getattr__(self, name):  # everything else is the tracker's
        return getattr(self._tracker, name)

    def log(self, metrics: dict, step: int | None = None) -> None:
        self._tracker.log(metrics, step)
        value = metrics.get(self._key)
        if step is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        self._values.append(float(value))
        if len(self._values) < SMOOTH_WINDOW:  # the first values of a window would not be the objective's smoothing
            return
        smoothed = sum(self._values[-SMOOTH_WINDOW:]) / SMOOTH_WINDOW
        self._trial.report(smoothed, step)
        if self._trial.should_prune():
            raise Pruned(step, smoothed)


def _search_trial():
    """The Optuna trial this job runs, with the search's pruner; None outside a pruning search."""
    trial_id = os.environ.get(TRIAL_ENV)
    hc = runtime.hydra_config()
    if not trial_id or hc is None or not hc.sweeper.get("pruner"):
        return None
    import optuna
    from hydra.utils import instantiate

    study = optuna.load_study(study_name=hc.sweeper.study_name, storage=hc.sweeper.storage,
                              pruner=instantiate(hc.sweeper.pruner))
    return optuna.trial.Trial(study, int(trial_id))


def trial_reporter(cfg: DictConfig, tracker):
    """`tracker`, or in a pruning search a TrialReporter around it (see the module doc)."""
    metric, _ = _settings(cfg)
    if not os.environ.get(TRIAL_ENV) or metric is None:
        return tracker
    if not metric.endswith("/loss_smoothed") or runtime.world_size() > 1:
        log.info("hpo: no pruning for hpo.metric=%s on %d process(es): only a training loss of a one-process job "
                 "is reported while it trains.", metric, runtime.world_size())
        return tracker
    trial = _search_trial()
    return tracker if trial is None else TrialReporter(tracker, trial, metric[:-len("_smoothed")])
