"""Experiment tracking behind one small interface; W&B or nothing. Tracking never stops training.

Every tracker on the main process also appends what it tracks to `<run_dir>/metrics.jsonl` (one JSON object a
line), so the same numbers W&B gets stay readable without W&B access (`ldm-report` reads them):

    {"event": "start",   "job_type", "name", "group", "tags", "config" (resolved), "system", "time"}
    {"event": "log",     "stage", "step", "metrics": {...}, "time"}
    {"event": "image",   "stage", "step", "key", "path", "caption", "time"}
    {"event": "summary", "summary": {...}, "time"}
    {"event": "artifact","name", "type", "path", "time"}
    {"event": "finish",  "exit_code", "time"}

A resumed run appends a new "start" and continues the steps; readers keep the last value per (stage, step).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import platform
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm_users.runtime import choice, hydra_config, is_multirun, override_dirname

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _jsonable(value):
    """Plain JSON types for tensors, numpy scalars and paths; anything else as its text."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # torch / numpy scalars
        try:
            return value.item()
        except (ValueError, RuntimeError):  # more than one element
            return _jsonable(value.tolist())
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def resolved_config(cfg: DictConfig) -> dict:
    """The nested config with every interpolation resolved; unresolvable ones are kept as their text."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception as err:  # e.g. ${hydra:...} outside a Hydra app: log what we can rather than nothing
        log.warning("config could not be fully resolved for tracking (%s); logging it unresolved.", err)
        return OmegaConf.to_container(cfg, resolve=False)


def hardware_profile() -> dict:
    """What this job actually runs on (the hardware=... profile only says what it was sized for)."""
    return copy.deepcopy(_hardware_profile())


@functools.lru_cache(maxsize=1)
def _hardware_profile() -> dict:
    import torch

    profile = {"python": platform.python_version(), "platform": platform.platform(), "host": platform.node(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "world_size": int(os.environ.get("WORLD_SIZE", "1")), "gpu_count": 0}
    for package in ("diffusers", "accelerate", "wandb"):
        try:
            profile[package] = __import__(package).__version__
        except Exception:
            pass
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        profile["gpu_count"] = count
        profile["gpus"] = []
        for i in range(count):
            props = torch.cuda.get_device_properties(i)
            profile["gpus"].append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 2),
                                    "capability": f"{props.major}.{props.minor}"})
    return profile


def run_name(cfg: DictConfig) -> str:
    """The job's overrides (e.g. `model=unet_light,hardware=gpu_8gb`): distinct for each job of a sweep."""
    overrides = override_dirname()
    if overrides:
        return overrides
    # ldm-eval's config has no model group: name the run by what it has.
    parts = [f"{key}={cfg[key].name}" for key in ("model", "hardware") if cfg.get(key) is not None]
    return ",".join(parts) or "default"


def sweep_group(cfg: DictConfig) -> str | None:
    """logger.group, else in a multirun the sweep: `<experiment>-<sweep dir name>` (a timestamp by default),
    the same for every job of one multirun, whatever process or machine runs it, and new for the next one."""
    if cfg.get("logger") is not None and cfg.logger.get("group"):
        return str(cfg.logger.group)
    if not is_multirun():
        return None
    name = Path(str(hydra_config().sweep.dir)).name
    experiment = choice("experiment")
    if experiment and experiment not in name:
        name = f"{experiment}-{name}"
    return name


def run_tags(cfg: DictConfig, job_type: str) -> list[str]:
    tags = [str(t) for t in (cfg.logger.get("tags") or [])] if cfg.get("logger") is not None else []
    for key in ("model", "hardware", "vae"):
        node = cfg.get(key)
        if node is not None and node.get("name"):
            tags.append(f"{key}={node.name}")
    experiment = choice("experiment")
    if experiment:
        tags.append(f"experiment={experiment}")
    tags.append(job_type)
    return list(dict.fromkeys(t[:64] for t in tags))  # W&B caps tags at 64 characters


class NullTracker:
    """Off the main process (and the base of the others): keeps the summary, writes nothing anywhere."""

    run_dir: Path | None = None

    def __init__(self, job_type: str = "train"):
        self.summary: dict = {}
        self.job_type = job_type
        self.stage = job_type

    def begin_stage(self, stage: str) -> None:
        """Later steps count on the `<stage>/step` axis (each stage of a job restarts at step 1)."""
        self.stage = stage

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


class LocalTracker(NullTracker):
    """logger=none, and the local copy under every W&B run: appends to `<run_dir>/metrics.jsonl`."""

    def __init__(self, run_dir: Path, job_type: str, cfg: DictConfig | None = None, extra: dict | None = None):
        super().__init__(job_type)
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self._write_failed = False
        record = {"event": "start", "job_type": job_type, **(extra or {})}
        if cfg is not None:
            record.setdefault("name", run_name(cfg))
            record.setdefault("group", sweep_group(cfg))
            record.setdefault("tags", run_tags(cfg, job_type))
            record["config"] = resolved_config(cfg)
        record["system"] = hardware_profile()
        self._write(record)

    def _write(self, record: dict) -> None:
        if self._write_failed:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            line = json.dumps(_jsonable({**record, "time": time.time()}))
            with open(self.metrics_path, "a", encoding="utf-8") as f:  # one line per write: a crash loses nothing
                f.write(line + "\n")
        except Exception as err:  # a full disk must not stop training either
            self._write_failed = True
            log.warning("could not write %s (%s); local metrics stop here.", self.metrics_path, err)

    def log(self, metrics: dict, step: int | None = None) -> None:
        self._write({"event": "log", "stage": self.stage, "step": step, "metrics": metrics})

    def log_image(self, key: str, path, step: int | None = None, caption: str = "") -> None:
        self._write({"event": "image", "stage": self.stage, "step": step, "key": key, "path": str(path),
                     "caption": caption})

    def set_summary(self, metrics: dict) -> None:
        super().set_summary(metrics)
        self._write({"event": "summary", "summary": metrics})

    def log_artifact(self, path, name: str, type: str) -> None:
        self._write({"event": "artifact", "name": name, "type": type, "path": str(path)})

    def finish(self, exit_code: int = 0) -> None:
        self._write({"event": "finish", "exit_code": int(exit_code)})


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a killed job) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def make_tracker(cfg: DictConfig, run_dir: Path, job_type: str, is_main_process: bool = True):
    """One tracker per job, on the main process only (under `accelerate launch` every rank calls this)."""
    if not is_main_process:
        return NullTracker(job_type)
    logger = cfg.get("logger")
    if logger is None or logger.get("name", "none") == "none":
        return LocalTracker(run_dir, job_type, cfg)
    from ldm_users.wandb_tracker import WandbTracker

    return WandbTracker.start(cfg, run_dir, job_type)
