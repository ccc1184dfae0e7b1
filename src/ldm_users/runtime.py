"""Where this process runs: inside a Hydra app or not, single run or multirun, which rank.

The one place that asks Hydra's runtime (HydraConfig) and the launcher's environment; everything else asks here.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig


def hydra_config():
    """Hydra's runtime config inside a Hydra app, else None (tests, notebooks, plain Python)."""
    try:
        return HydraConfig.get()
    except ValueError:  # "HydraConfig was not set": not inside a Hydra app
        return None


def is_multirun() -> bool:
    hc = hydra_config()
    return hc is not None and str(hc.mode) == "RunMode.MULTIRUN"


def output_dir(default: str = "outputs/runs/default") -> Path:
    """The job's output dir (ldm-train: the run dir): Hydra's, else (outside a Hydra app) `default`."""
    hc = hydra_config()
    return Path(hc.runtime.output_dir) if hc is not None else Path(default)


def choice(group: str) -> str | None:
    """Which option of a config group Hydra composed (e.g. choice("experiment") -> "smoke"), None if none."""
    hc = hydra_config()
    if hc is None:
        return None
    value = hc.runtime.choices.get(group)
    return None if value in (None, "null", "None") else str(value)


def override_dirname() -> str:
    hc = hydra_config()
    return hc.job.override_dirname if hc is not None else ""


def task_overrides() -> list[str]:
    hc = hydra_config()
    return list(hc.overrides.task) if hc is not None else []


def rank() -> int:
    """This process's global rank (torchrun, accelerate launch, SLURM tasks); 0 when launched alone."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_rank() -> bool:
    return rank() == 0
