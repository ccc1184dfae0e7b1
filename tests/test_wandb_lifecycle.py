"""The W&B side of a run's life, end to end through the entry points: stopped and resumed, rerun with evaluation,
evaluated again with ldm-eval, and its export evaluated elsewhere. One run dir = one W&B run; every step once."""

import shutil
import subprocess
import sys

import pytest

from ldm_users.tracking import METRICS_FILE, read_metrics
from ldm_users.tracking.wandb import stored_run_id
from wandb_offline import history, inspect_records, inspect_summary, offline_runs, run_record

pytestmark = pytest.mark.slow

TRAIN = [sys.executable, "-m", "ldm_users.cli.train", "experiment=smoke", "logger.mode=offline",
         "train.log_interval=5", "train.save_interval=10", "eval.images_per_user=2"]


def _run(args, tmp_path):
    out = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def test_kill_rerun_eval_rerun_and_ldm_eval_share_one_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    at = [f"hydra.run.dir={run_dir}"]
    _run(TRAIN + at + ["train.stop_at_step=20"], tmp_path)
    # As if killed after logging step 20 but before its checkpoint was complete: the rerun replays 11..20.
    shutil.rmtree(run_dir / "ldm" / "checkpoints" / "checkpoint-0000020")
    _run(TRAIN + at, tmp_path)
    _run(TRAIN + at + ["eval.enabled=true"], tmp_path)
    _run([sys.executable, "-m", "ldm_users.cli.eval", f"export_path={run_dir}", "eval.images_per_user=2",
          "logger.mode=offline", f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path)

    run_id = stored_run_id(run_dir)
    attempts = offline_runs(run_dir)
    assert run_id and len(attempts) == 4 and all(f"-{run_id}" in p.name for p in attempts)
    steps, names = [], set()
    for path in attempts:
        records = inspect_records(path)
        assert run_record(records)["run_id"] == run_id
        names.add(run_record(records).get("display_name"))
        steps += [row["ldm/step"] for row in history(records) if "ldm/step" in row and any(
            key.endswith("/loss") for key in row)]
    assert sorted(steps) == [5, 10, 15, 20, 25, 30]  # every logged step once, across the attempts
    summary = inspect_summary(attempts[-1])["summary"]
    assert summary["ldm/loss_smoothed"] > 0 and 0 <= summary["eval/user_acc/top1"] <= 1
    assert not any(isinstance(v, float) and v != v for v in summary.values())  # no NaN anywhere
    assert not (tmp_path / "eval" / "wandb").exists()  # ldm-eval wrote into the run's own W&B run
    local = read_metrics(run_dir / METRICS_FILE)
    assert [r["step"] for r in local if r["event"] == "log" and r["stage"] == "ldm"] == [5, 10, 15, 20, 25, 30]
