"""Experiment tracking behind one small interface; W&B or nothing. Tracking never stops training."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)


class NullTracker:
    """Logger=none: keeps the last metrics (for summaries and tests) and sends nothing anywhere."""

    run_dir: Path | None = None

    def __init__(self):
        self.summary: dict = {}

    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_image(self, key: str, path: str | os.PathLike, step: int | None = None, caption: str = "") -> None:
        pass

    def set_summary(self, metrics: dict) -> None:
        self.summary.update(metrics)

    def log_artifact(self, path: str | os.PathLike, name: str, type: str) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def make_tracker(cfg: DictConfig, run_dir: Path, job_type: str, is_main_process: bool = True):
    if not is_main_process or cfg.logger.name == "none":
        return NullTracker()
    from ldm_users.wandb_tracker import WandbTracker

    return WandbTracker.start(cfg, run_dir, job_type)
