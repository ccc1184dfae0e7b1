"""Experiment tracking behind one small interface; W&B or nothing. Tracking never stops training.

base.py: NullTracker (off the main process), LocalTracker (`<run_dir>/metrics.jsonl`, always written) and its
reader; naming.py: run name, sweep group, tags, hardware profile; wandb.py: WandbTracker (a LocalTracker that
also logs to W&B). `make_tracker` picks one per job.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from ldm_users.tracking.base import (METRICS_FILE, LocalTracker, NullTracker, jsonable, read_metrics,
                                     resolved_config)
from ldm_users.tracking.naming import hardware_profile, run_name, run_tags, sweep_group

log = logging.getLogger(__name__)

__all__ = ["METRICS_FILE", "LocalTracker", "NullTracker", "hardware_profile", "jsonable", "make_tracker",
           "read_metrics", "resolved_config", "run_name", "run_tags", "sweep_group"]


def make_tracker(cfg: DictConfig, run_dir: Path, job_type: str, is_main_process: bool = True, join: bool = False,
                 config: dict | None = None):
    """One tracker per job, on the main process only (under `accelerate launch` every rank calls this).

    join=True continues the W&B run already tracking `run_dir` (e.g. ldm-eval on a run dir) without renaming,
    regrouping or retagging it; `config` is then what it adds to that run's config.
    """
    if not is_main_process:
        return NullTracker(job_type)
    logger = cfg.get("logger")
    if logger is None or logger.get("name", "none") == "none":
        return LocalTracker(run_dir, job_type, cfg)
    try:  # wandb is slow to import: logger=none never pays for it
        from ldm_users.tracking.wandb import WandbTracker
    except Exception as err:
        log.warning("wandb cannot be imported (%s); tracking to %s only.", err, Path(run_dir) / METRICS_FILE)
        return LocalTracker(run_dir, job_type, cfg)
    return WandbTracker.start(cfg, run_dir, job_type, config=config, join=join)
