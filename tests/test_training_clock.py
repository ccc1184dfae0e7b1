"""The training clock (train.max_train_seconds, train.snapshot_at_seconds) on a fake clock: one second per step."""

import itertools
import json

import pytest

from ldm_users.cli.train import run
from ldm_users.errors import ConfigError
from ldm_users.training import checkpoint as ckpt
from ldm_users.training import clock
from ldm_users.training.clock import TrainingClock
from tests.helpers import compose, hydra_job


@pytest.fixture
def one_second_per_step(monkeypatch):
    """clock.now is read at the start and the end of each step only: counting calls makes every step 1 s."""
    ticks = itertools.count()
    monkeypatch.setattr(clock, "now", lambda: float(next(ticks)))


def _train(run_dir, *overrides):
    with hydra_job(run_dir, "experiment=smoke", "logger=none", "train.max_steps=30", *overrides) as cfg:
        return run(cfg)


def _snapshot(run_dir, name):
    return json.loads((run_dir / "snapshots" / name / "snapshot.json").read_text())


def test_clock_fires_each_snapshot_once_and_survives_a_restore(one_second_per_step):
    c = TrainingClock(max_seconds=3.0, snapshot_at=[1.5, 3.0])
    seen = []
    for _ in range(3):
        c.start()
        c.stop()
        seen.append(c.due())
        c.taken.update({clock.snapshot_name(s): len(seen) for s in c.due()})
    assert seen == [[], [1.5], [3.0]] and c.over_budget()
    resumed = TrainingClock(max_seconds=5.0, snapshot_at=[1.5, 3.0, 4.0])
    resumed.restore(c.state())
    assert resumed.elapsed == 3.0 and resumed.due() == [] and not resumed.over_budget()
    assert resumed.taken == {"1.5s": 2, "3s": 3}


def test_clock_refuses_non_positive_seconds():
    cfg = compose("experiment=smoke", "train.snapshot_at_seconds=[0,5]")
    with pytest.raises(ConfigError, match="positive seconds"):
        TrainingClock.from_cfg(cfg.train, "train")


@pytest.mark.slow
def test_time_budget_snapshots_stop_export_and_resume(tmp_path, one_second_per_step):
    result = _train(tmp_path, "train.snapshot_at_seconds=[2,5]", "train.max_train_seconds=7")
    assert [_snapshot(tmp_path, n)["step"] for n in ("2s", "5s")] == [2, 5]
    assert _snapshot(tmp_path, "5s")["images_seen"] == 5 * 8  # smoke: batch 8 on the CPU profile
    for name in ("2s", "5s"):  # loadable exports, as the final one
        assert (tmp_path / "snapshots" / name / "model_index.json").exists()
        assert (tmp_path / "snapshots" / name / "training_config.yaml").exists()
    root = tmp_path / "ldm" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-0000007"]
    assert ckpt.read_state(root / "checkpoint-0000007")["train_seconds"] == 7.0
    assert result["export"] and (tmp_path / "export" / "model_index.json").exists()

    # A longer budget continues the clock from the checkpoint: 2s and 5s are not taken again, 8s is.
    before = (tmp_path / "snapshots" / "2s" / "snapshot.json").stat().st_mtime_ns
    _train(tmp_path, "train.snapshot_at_seconds=[2,5,8]", "train.max_train_seconds=9")
    assert (tmp_path / "snapshots" / "2s" / "snapshot.json").stat().st_mtime_ns == before
    assert _snapshot(tmp_path, "8s")["step"] == 8
    state = ckpt.read_state(ckpt.latest_checkpoint(root))
    assert state["step"] == 9 and state["train_seconds"] == 9.0 and state["snapshots"] == {"2s": 2, "5s": 5, "8s": 8}
