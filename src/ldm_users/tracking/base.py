"""The trackers without W&B (NullTracker, LocalTracker) and the local metrics file they share with it.

Every tracker on the main process also appends what it tracks to `<run_dir>/metrics.jsonl` (one JSON object a
line), so the same numbers W&B gets stay readable without W&B access (`ldm-report` reads them):

    {"event": "start",   "job_type", "name", "group", "tags", "config" (resolved), "system", "time"}
    {"event": "stage",   "stage", "time"}                      (a stage begins: wall-clock per stage)
    {"event": "log",     "stage", "step", "metrics": {...}, "time"}
    {"event": "image",   "stage", "step", "key", "path", "caption", "time"}
    {"event": "table",   "stage", "key", "columns", "rows", "time"}   (e.g. per-user eval metrics)
    {"event": "summary", "summary": {...}, "time"}
    {"event": "artifact","name", "type", "path", "time"}
    {"event": "finish",  "exit_code", "time"}

A resumed run appends a new "start" and continues after the last step it logged (the replayed steps since the
checkpoint are bit-identical, so they are not logged twice). At finish, the figures runs are compared by are
derived from the whole history (tracking/summary.py) and written as a summary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm_users.tracking.naming import hardware_profile, run_name, run_tags, sweep_group
from ldm_users.tracking.summary import derived_summary

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "wandb_run.json"  # the W&B run a run dir is tracked under: {"id": ..., "url": ... once online}


def stored_wandb_run(run_dir: Path) -> dict:
    """The run dir's RUN_ID_FILE ({} when it was never tracked with W&B)."""
    try:
        stored = json.loads((Path(run_dir) / RUN_ID_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def jsonable(value):
    """Plain JSON types for tensors, numpy scalars and paths; anything else as its text."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):  # torch / numpy scalars
        try:
            return value.item()
        except (ValueError, RuntimeError):  # more than one element
            return jsonable(value.tolist())
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

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        pass

    def log_image(self, key: str, path: str | os.PathLike, step: int | None = None, caption: str = "") -> None:
        pass

    def set_summary(self, metrics: dict) -> None:
        self.summary.update(metrics)

    def log_artifact(self, path: str | os.PathLike, name: str, type: str) -> None:
        pass

    def use_artifact(self, path: str | os.PathLike, name: str, type: str) -> None:
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
        # The last step logged per stage by earlier attempts of this run: a resumed run replays the steps since its
        # checkpoint with bit-identical results, so those are not logged twice.
        self._logged = last_logged_steps(self.metrics_path)
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
            line = json.dumps(jsonable({**record, "time": time.time()}))
            with open(self.metrics_path, "a", encoding="utf-8") as f:  # one line per write: a crash loses nothing
                f.write(line + "\n")
        except Exception as err:  # a full disk must not stop training either
            self._write_failed = True
            log.warning("could not write %s (%s); local metrics stop here.", self.metrics_path, err)

    def begin_stage(self, stage: str) -> None:
        super().begin_stage(stage)
        self._write({"event": "stage", "stage": stage})

    def is_logged(self, step: int | None) -> bool:
        """True when an earlier attempt of this run already logged `step` of the current stage."""
        return step is not None and step <= self._logged.get(self.stage, 0)

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.is_logged(step):
            return
        if step is not None:
            self._logged[self.stage] = step
        self._write({"event": "log", "stage": self.stage, "step": step, "metrics": metrics})

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        self._write({"event": "table", "stage": self.stage, "key": key, "columns": columns, "rows": rows})

    def log_image(self, key: str, path, step: int | None = None, caption: str = "") -> None:
        self._write({"event": "image", "stage": self.stage, "step": step, "key": key, "path": str(path),
                     "caption": caption})

    def set_summary(self, metrics: dict) -> None:
        # A NaN would overwrite a real figure of an earlier attempt (W&B keeps the last summary value).
        metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
        super().set_summary(metrics)
        self._write({"event": "summary", "summary": metrics})

    def log_artifact(self, path, name: str, type: str) -> None:
        self._write({"event": "artifact", "name": name, "type": type, "path": str(path)})

    def use_artifact(self, path, name: str, type: str) -> None:
        self._write({"event": "use_artifact", "name": name, "type": type, "path": str(path)})

    def finish(self, exit_code: int = 0) -> None:
        if not self._write_failed and self.metrics_path.exists():
            derived = derived_summary(read_metrics(self.metrics_path))
            if derived:
                self.set_summary(derived)
        self._write({"event": "finish", "exit_code": int(exit_code)})


def last_logged_steps(path: Path) -> dict[str, int]:
    """stage -> the largest step logged in an existing metrics.jsonl (empty for a new run)."""
    last: dict[str, int] = {}
    if Path(path).exists():
        for rec in read_metrics(path):
            if rec.get("event") == "log" and rec.get("step") is not None:
                last[rec["stage"]] = max(last.get(rec["stage"], 0), int(rec["step"]))
    return last


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
