"""The number a hyperparameter search optimises: what `ldm-train`'s Hydra main returns.

An optimising sweeper (`hydra/sweeper=optuna`, set by `hparams_search=...`) launches ldm-train jobs and reads
each job's return value as its objective. The objective is the run-summary key `hpo.metric` (e.g.
`ldm/loss_smoothed`, or `eval/user_acc/top1` with `eval.enabled=true`), optimised in `hpo.direction`
(minimize | maximize).

A trial whose training failed returns the worst value for the direction (+inf when minimising, -inf when
maximising). That is a value the Optuna sweeper accepts: the study records the trial as complete but never best,
TPE learns to avoid its region, and the next trial starts. (With hydra-optuna-sweeper 1.2/1.3 a NaN would end the
whole study: optuna refuses it even when the sweeper then reports the trial as failed; and a non-number counts
against `max_failure_rate`, 0 by default.) The job's own status.json and W&B run still say failed, and the sweep
exits 1 at the end as for any failed job.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from omegaconf import DictConfig

from ldm_users import runtime
from ldm_users.errors import ConfigError

log = logging.getLogger("ldm_users.hpo")

DIRECTIONS = ("minimize", "maximize")


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


def objective(cfg: DictConfig, result: Any) -> float | None:
    """The job's objective from `run()`'s result; the worst value for a failed job (result None).

    Outside an optimising sweep a missing metric is no error (stage=vae has no loss to return): None.
    """
    metric, direction = _settings(cfg)
    if metric is None:
        return None
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
    log.info("hpo: objective %s = %.6g (%s)", metric, value, direction)
    return value
