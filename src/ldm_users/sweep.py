"""Multirun jobs that fail alone.

Hydra's sweepers re-raise a job's exception after its batch and skip every later batch (and a SystemExit
from one job ends the whole sweep at once). In a multirun, `run_job` instead records the failure in the job's
`status.json`, logs it and lets the next job start; `SweepStatusCallback` (conf: hydra.callbacks) then writes
`<sweep dir>/sweep_status.json` and makes the process exit 1 when any job failed. A single run still fails
as before (exit 1 with the traceback, or exit 2 with one line for a user error), after writing its status.
Between jobs of one process the CUDA peak-memory counters and accelerate's singletons are reset, so each
job reports its own peak memory and may use another precision or accumulation.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.state import AcceleratorState, GradientState
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ldm_users.config import run_dir_name
from ldm_users.errors import LdmUsersError
from ldm_users.io import write_json
from ldm_users.runtime import hydra_config, is_main_rank, is_multirun, world_size
from ldm_users.training.signals import TrainingInterrupted

log = logging.getLogger("ldm_users.sweep")

STATUS_FILE = "status.json"
SWEEP_STATUS_FILE = "sweep_status.json"


def job_info() -> dict:
    hc = hydra_config()
    if hc is None:
        return {"num": None, "name": "", "overrides": []}
    num = hc.job.get("num")
    return {"num": int(num) if num is not None else None, "name": run_dir_name(hc.job.override_dirname),
            "overrides": list(hc.overrides.task)}


def write_status(directory: Path, record: dict, name: str = STATUS_FILE) -> Path:
    # Atomic: readers (the callback, ldm-report) never see half a file.
    return write_json(Path(directory) / name, record, indent=2)


def reset_between_jobs() -> None:
    """Free what a finished job held and reset per-job counters (jobs of a basic/joblib sweep share a process)."""
    gc.collect()
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            for device in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(device)
    except Exception as err:  # never let housekeeping fail a job
        log.debug("CUDA reset skipped: %s", err)
    try:
        # AcceleratorState is a process-wide singleton: without this, a second job asking for another
        # mixed precision raises "AcceleratorState has already been initialized". The distributed
        # PartialState (process group) is kept: it is the same for every job under `accelerate launch`.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    except Exception as err:
        log.debug("accelerate reset skipped: %s", err)


def run_job(fn: Callable[[DictConfig], Any], cfg: DictConfig, job_dir: Path) -> Any:
    """fn(cfg), with its outcome in `<job_dir>/status.json`; in a multirun a failure does not propagate."""
    # Under `accelerate launch` every rank runs the Hydra app; only the main rank writes the job's files.
    multirun, main = is_multirun(), is_main_rank()
    info = job_info()
    started = time.time()
    record = {"job": info["num"], "name": info["name"], "overrides": info["overrides"], "job_dir": str(job_dir),
              "started_at": started}
    reset_between_jobs()
    try:
        result = fn(cfg)
    except BaseException as err:
        reset_between_jobs()
        if isinstance(err, SystemExit) and err.code in (0, None):
            raise
        # A signal (SLURM preemption, Ctrl-C) stops the whole sweep: the job checkpointed and a rerun resumes it.
        interrupted = isinstance(err, (KeyboardInterrupt, TrainingInterrupted))
        record.update(status="interrupted" if interrupted else "failed", error=f"{type(err).__name__}: {err}",
                      traceback="".join(traceback.format_exception(err)), finished_at=time.time(),
                      duration_s=round(time.time() - started, 3))
        path = write_status(job_dir, record) if main else Path(job_dir) / STATUS_FILE
        if interrupted or not multirun:
            raise
        # A user error's message says what to fix, a traceback would bury it; anything else gets one.
        log.error("job %s (%s) FAILED: %s: %s [status in %s; the sweep goes on and exits 1 at the end]",
                  info["num"], info["name"], type(err).__name__, err, path,
                  exc_info=None if isinstance(err, LdmUsersError) else err)
        return None
    reset_between_jobs()
    record.update(status="ok", finished_at=time.time(), duration_s=round(time.time() - started, 3))
    if main:
        write_status(job_dir, record)
    return result


def collect_statuses(sweep_dir: Path, since: float | None = None) -> list[dict]:
    """The status.json of each job under a sweep dir (those written since `since`, when given), by job number."""
    statuses = []
    for path in Path(sweep_dir).rglob(STATUS_FILE):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if since is not None and float(record.get("started_at") or 0) < since:
            continue  # a job of an earlier multirun into the same sweep dir
        record.setdefault("job_dir", str(path.parent))
        statuses.append(record)
    return sorted(statuses, key=lambda r: (r.get("job") is None, r.get("job") or 0, r["job_dir"]))


class SweepStatusCallback(Callback):
    """On multirun end: summarize the jobs' status files and exit 1 when any job failed."""

    def __init__(self) -> None:
        self.started: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        overrides = [str(o) for o in OmegaConf.select(config, "hydra.overrides.hydra", default=[]) or []]
        if world_size() > 1 and not any(o.startswith("hydra.sweep.dir=") for o in overrides):
            # Every rank runs the whole sweep; the default sweep dir holds the time each rank resolved it at,
            # which may differ by a second and split the ranks of one job into two dirs.
            print("error: a multirun under `accelerate launch` needs an explicit sweep dir shared by every rank: "
                  "add hydra.sweep.dir=outputs/multirun/<name>.", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_main_rank():  # under `accelerate launch` rank 0 writes the statuses and reports them
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        since = self.started - 5.0 if self.started is not None else None
        statuses = collect_statuses(sweep_dir, since)
        failed = [s for s in statuses if s.get("status") != "ok"]
        summary = {"sweep_dir": str(sweep_dir), "jobs": len(statuses), "failed": len(failed),
                   "statuses": [{k: s.get(k) for k in ("job", "name", "status", "error", "job_dir")}
                                for s in statuses]}
        write_status(sweep_dir, summary, SWEEP_STATUS_FILE)
        if failed:
            lines = [f"ldm-train: {len(failed)} of {len(statuses)} jobs failed:"]
            lines += [f"  job {s.get('job')} ({s.get('name')}): {s.get('error')}  [{s['job_dir']}]" for s in failed]
            print("\n".join(lines), file=sys.stderr, flush=True)
            sys.exit(1)
        print(f"ldm-train: all {len(statuses)} jobs finished. Compare them:\n  $ ldm-report {sweep_dir}", flush=True)
