"""One run dir, one W&B run: reruns continue it, replayed steps are not logged twice, and the figures runs are
compared by are derived from the whole history (never a NaN from an attempt that trained nothing)."""

import json
import math

from ldm_users.config import compose
from ldm_users.tracking import METRICS_FILE, make_tracker, read_metrics
from ldm_users.tracking.summary import derived_summary
from ldm_users.tracking.wandb import RUN_ID_FILE, WandbTracker
from wandb_offline import history, inspect_records, offline_runs, run_record


def _cfg():
    return compose(["experiment=smoke", "logger.mode=offline"])


def _attempt(run_dir, steps, summary=None):
    tracker = make_tracker(_cfg(), run_dir, "train")
    assert isinstance(tracker, WandbTracker)
    tracker.begin_stage("ldm")
    for step in steps:
        tracker.log({"ldm/loss": 1.0 / step, "ldm/images_per_sec": float(step)}, step=step)
    if summary:
        tracker.set_summary(summary)
    tracker.finish(0)


def test_rerun_continues_the_same_wandb_run_without_duplicate_steps(tmp_path):
    run_dir = tmp_path / "run"
    _attempt(run_dir, range(1, 6))           # killed after logging step 5; its checkpoint was at step 3
    _attempt(run_dir, range(4, 9))           # the rerun replays steps 4 and 5 from the checkpoint
    _attempt(run_dir, [], {"final/loss": float("nan"), "eval/user_acc/top1": 0.9})  # eval-only rerun

    run_id = json.loads((run_dir / RUN_ID_FILE).read_text())["id"]
    runs = offline_runs(run_dir)
    assert len(runs) == 3 and all(f"-{run_id}" in p.name for p in runs)  # three attempts, one W&B run id
    steps = []
    for path in runs:
        records = inspect_records(path)
        assert run_record(records)["run_id"] == run_id
        steps += [row["ldm/step"] for row in history(records) if "ldm/loss" in row]
    assert sorted(steps) == list(range(1, 9))  # every step once

    local = read_metrics(run_dir / METRICS_FILE)
    assert [r["step"] for r in local if r["event"] == "log"] == list(range(1, 9))
    summaries = [r["summary"] for r in local if r["event"] == "summary"]
    assert all("final/loss" not in s for s in summaries)  # the NaN was dropped, not written over a real value
    last = summaries[-1]
    assert math.isclose(last["ldm/loss_smoothed"], sum(1 / s for s in range(4, 9)) / 5)
    assert last["ldm/images_per_sec_median"] == 4.5


def test_derived_summary_is_from_the_whole_history():
    records = [{"event": "start", "time": 0.0}, {"event": "stage", "stage": "vae", "time": 1.0},
               {"event": "log", "stage": "vae", "step": 10, "metrics": {"vae/loss": 2.0, "vae/images_per_sec": 5.0},
                "time": 3.0},
               {"event": "stage", "stage": "ldm", "time": 4.0},
               {"event": "log", "stage": "ldm", "step": 10, "metrics": {"ldm/loss": 1.0, "ldm/peak_memory_gib": 2.0},
                "time": 9.0},
               {"event": "start", "time": 100.0}, {"event": "stage", "stage": "ldm", "time": 101.0},
               {"event": "log", "stage": "ldm", "step": 20, "metrics": {"ldm/loss": float("nan"),
                                                                         "ldm/peak_memory_gib": 3.0}, "time": 103.0}]
    out = derived_summary(records)
    assert out == {"vae/loss_smoothed": 2.0, "vae/images_per_sec_median": 5.0, "ldm/loss_smoothed": 1.0,
                   "ldm/peak_memory_gib": 3.0, "vae/wall_clock_s": 2.0, "ldm/wall_clock_s": 7.0}
