"""What the tests share besides fixtures (those are in conftest.py): composing configs, running code the way a
Hydra app's job runs it, through Hydra's own API, and counting what torch.compile builds."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterator

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

from ldm_users.config import compose as compose_config

REPO = Path(__file__).resolve().parents[1]


def compose(*overrides: str, config_name: str = "config") -> DictConfig:
    return compose_config(list(overrides), config_name)


@contextlib.contextmanager
def hydra_job(run_dir: str | Path | None, *overrides: str, config_name: str = "config") -> Iterator[DictConfig]:
    """Inside the block, Hydra's runtime is what the job of `ldm-train <overrides>` sees (as Hydra's own
    `run_job` sets it up), with its output dir at run_dir (None: where the app would put it, hydra.run.dir);
    yields the job's config (without the `hydra` node, as an app gets it)."""
    extra = [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
    cfg = compose_config([*overrides, *extra], config_name, return_hydra_config=True)
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)  # first, so that ${hydra:...} in hydra.run.dir resolves
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(Path(str(cfg.hydra.run.dir)).absolute())
    HydraConfig.instance().set_config(cfg)
    job = copy.deepcopy(cfg)
    with read_write(job), open_dict(job):
        del job["hydra"]
    try:
        yield job
    finally:
        HydraConfig.instance().cfg = saved  # as Hydra's own run_job restores it after a job


class CompiledGraphs:
    """How many graphs torch.compile has built since this counter was made. It resets dynamo first: a graph an
    earlier test compiled would otherwise be reused, not built, and a missed (re)compilation would go uncounted."""

    def __init__(self) -> None:
        import torch

        torch._dynamo.reset()
        self._start = self._built()

    @staticmethod
    def _built() -> int:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]

    def __call__(self) -> int:
        return self._built() - self._start
