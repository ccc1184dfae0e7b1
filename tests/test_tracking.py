"""Trackers: what an offline W&B run holds (read back with wandb's own reader), the local metrics.jsonl copy,
offline by itself, and tracking faults that never stop training."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import wandb
from PIL import Image

from ldm_users.tracking import METRICS_FILE, LocalTracker, NullTracker, make_tracker, read_metrics
from ldm_users.tracking import wandb as wandb_tracker
from ldm_users.tracking.wandb import WandbTracker, choose_mode
from tests.helpers import compose
from tests.wandb_offline import history, inspect_records, inspect_summary, offline_runs, run_record


def _png(path, size=(8, 4)):
    Image.fromarray(np.full((size[1], size[0], 3), 200, np.uint8)).save(path)
    return path


def test_offline_run_holds_resolved_config_metrics_images_summary_artifact(tmp_path):
    cfg = compose("experiment=smoke", "logger.group=g-test", "logger.tags=[mine]")
    run_dir = tmp_path / "run"
    tracker = make_tracker(cfg, run_dir, "all")
    assert isinstance(tracker, WandbTracker)
    tracker.begin_stage("vae")
    tracker.log({"vae/loss": 0.5}, step=1)
    tracker.log({"vae/loss": 0.25}, step=2)
    tracker.begin_stage("ldm")  # its steps restart at 1: they must not be dropped as "going backwards"
    tracker.log({"ldm/loss": 1.5, "ldm/lr": 1e-3, "ldm/images_per_sec": torch.tensor(12.0)}, step=1)
    tracker.log_image("ldm/samples", _png(tmp_path / "grid.png"), step=1, caption="one row per user")
    tracker.set_summary({"ldm/loss_smoothed": 1.5, "params/denoiser": 1234, "params/user_encoder": 56})
    export = tmp_path / "export"
    export.mkdir()
    (export / "model_index.json").write_text("{}")
    tracker.log_artifact(export, name="export-unet_tiny", type="model")
    tracker.finish(0)

    runs = offline_runs(run_dir)
    assert len(runs) == 1
    summary = inspect_summary(runs[0])
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    assert summary["name"] == "model-unet_tiny+hardware-cpu"  # outside a Hydra app: model and hardware
    config = summary["config"]
    assert "${" not in json.dumps(config)  # every interpolation resolved
    assert config["model"]["denoiser"]["sample_size"] == 8  # ${ldm_latent_size:32,...} -> 32 px / 4
    assert config["train"]["sample_interval"] == 1000 and "sample_interval" not in config["hardware"]
    assert config["model"]["name"] == "unet_tiny" and config["hardware"]["name"] == "cpu"
    assert config["system"]["torch"] == torch.__version__ and config["system"]["gpu_count"] == 0
    assert config["params"] == {"denoiser": 1234, "user_encoder": 56}  # parameter counts as config keys
    assert summary["summary"]["ldm/loss_smoothed"] == 1.5 and summary["summary"]["params/denoiser"] == 1234

    records = inspect_records(runs[0])
    run = run_record(records)
    assert run["run_group"] == "g-test" and run["job_type"] == "all"
    assert {"mine", "model=unet_tiny", "hardware=cpu", "all"} <= set(run["tags"])
    rows = history(records)
    assert [(r["vae/step"], r["vae/loss"]) for r in rows if "vae/loss" in r] == [(1, 0.5), (2, 0.25)]
    ldm = [r for r in rows if "ldm/loss" in r]
    assert len(ldm) == 1 and ldm[0]["ldm/step"] == 1 and ldm[0]["ldm/images_per_sec"] == 12.0
    image = next(r for r in rows if "ldm/samples._type" in r)
    assert image["ldm/samples._type"] == "image-file" and image["ldm/step"] == 1
    assert image["ldm/samples.caption"] == "one row per user" and image["ldm/samples.width"] == 8
    assert (runs[0] / "files" / image["ldm/samples.path"]).is_file()
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert len(artifacts) == 1 and artifacts[0]["name"] == "export-unet_tiny" and artifacts[0]["type"] == "model"

    # The same data, readable without W&B.
    local = read_metrics(run_dir / METRICS_FILE)
    assert [r["event"] for r in local] == ["start", "stage", "log", "log", "stage", "log", "image", "summary",
                                           "artifact", "summary", "finish"]  # the last summary: derived at finish
    assert local[0]["wandb_id"] == run["run_id"] and local[0]["config"]["model"]["denoiser"]["sample_size"] == 8
    assert [(r["stage"], r["step"]) for r in local if r["event"] == "log"] == [("vae", 1), ("vae", 2), ("ldm", 1)]
    assert [r for r in local if r["event"] == "log"][2]["metrics"]["ldm/images_per_sec"] == 12.0  # a tensor's number


def test_failed_job_is_marked_failed_and_an_open_run_never_gets_the_next_jobs_data(tmp_path):
    cfg = compose("experiment=smoke")
    first = make_tracker(cfg, tmp_path / "a", "all")
    first.log({"ldm/loss": 1.0}, step=1)
    first.finish(exit_code=1)
    (tmp_path / "stray").mkdir()
    stray = wandb.init(mode="offline", dir=str(tmp_path / "stray"), project="other")  # left open
    second = make_tracker(cfg, tmp_path / "b", "all")
    assert second.run.id != stray.id  # wandb would hand back the open run without finish + reinit
    second.log({"ldm/loss": 2.0}, step=1)
    second.finish(0)

    failed = inspect_summary(offline_runs(tmp_path / "a")[0])
    assert failed["state"] == "failed" and failed["exit_code"] == 1
    assert inspect_summary(offline_runs(tmp_path / "stray")[0])["summary"].get("ldm/loss") is None
    ok = inspect_summary(offline_runs(tmp_path / "b")[0])
    assert ok["state"] == "finished" and ok["summary"]["ldm/loss"] == 2.0


def test_without_api_key_goes_offline_by_itself_with_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose("experiment=smoke")
    assert cfg.logger.mode is None
    with caplog.at_level(logging.WARNING):
        tracker = make_tracker(cfg, tmp_path / "run", "all")
        tracker.finish(0)
    assert isinstance(tracker, WandbTracker) and tracker.mode == "offline"
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("ldm_users")]
    offline_dir = offline_runs(tmp_path / "run")[0]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "no W&B API key" in lines[0] and f"`wandb sync {offline_dir}`" in lines[0]


def test_mode_choice(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(wandb_tracker, "_reachable", lambda timeout=3.0: False)
    mode, why = choose_mode(None)
    assert mode == "offline" and "unreachable" in why
    monkeypatch.setattr(wandb_tracker, "_reachable", lambda timeout=3.0: True)
    assert choose_mode(None) == ("online", None)
    assert choose_mode("disabled") == ("disabled", None)  # logger.mode wins
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert choose_mode(None) == ("offline", None)


def test_online_start_failure_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    real_init = wandb.init

    def init(**kwargs):
        if kwargs["mode"] == "online":
            raise ConnectionError("api.wandb.ai: connection refused")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb_tracker, "choose_mode", lambda requested: ("online", None))
    monkeypatch.setattr(wandb, "init", init)
    with caplog.at_level(logging.WARNING):
        tracker = make_tracker(compose("experiment=smoke"), tmp_path / "run", "all")
        tracker.finish(0)
    assert isinstance(tracker, WandbTracker) and tracker.mode == "offline"
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("ldm_users")]
    assert len(lines) == 1 and "did not start online" in lines[0] and "wandb sync" in lines[0]


def test_tracking_faults_never_stop_training(tmp_path, monkeypatch):
    cfg = compose("experiment=smoke")
    tracker = make_tracker(cfg, tmp_path / "live", "all")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tracker.run, "log", broken)
    tracker.log({"ldm/loss": 1.0}, step=1)  # must not raise
    tracker.log_image("ldm/samples", _png(tmp_path / "g.png"), step=1)
    assert tracker.failed
    tracker.set_summary({"ldm/loss_smoothed": 1.0})
    tracker.finish(0)
    local = read_metrics(tmp_path / "live" / METRICS_FILE)
    # The local copy goes on (the second summary is the one derived from the history at finish).
    assert [r["event"] for r in local] == ["start", "log", "image", "summary", "summary", "finish"]

    monkeypatch.setattr(wandb, "init", broken)
    fallback = make_tracker(cfg, tmp_path / "dead", "all")
    assert type(fallback) is LocalTracker
    fallback.log({"ldm/loss": 3.0}, step=5)
    fallback.finish(1)
    assert read_metrics(tmp_path / "dead" / METRICS_FILE)[1]["metrics"] == {"ldm/loss": 3.0}


def test_logger_none_and_non_main_ranks(tmp_path):
    cfg = compose("experiment=smoke", "logger=none")
    local = make_tracker(cfg, tmp_path / "main", "ldm")
    assert type(local) is LocalTracker
    local.log({"ldm/loss": 0.5}, step=10)
    local.finish(0)
    assert not (tmp_path / "main" / "wandb").exists()
    records = read_metrics(tmp_path / "main" / METRICS_FILE)
    assert records[0]["config"]["logger"]["name"] == "none" and records[1]["step"] == 10

    other_rank = make_tracker(compose("experiment=smoke"), tmp_path / "rank1", "ldm", is_main_process=False)
    assert type(other_rank) is NullTracker
    other_rank.log({"ldm/loss": 0.5}, step=1)
    other_rank.set_summary({"ldm/loss_smoothed": 0.5})
    other_rank.finish(0)
    assert other_rank.summary == {"ldm/loss_smoothed": 0.5} and not (tmp_path / "rank1").exists()


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"event": "log", "step": 1, "metrics": {"ldm/loss": NaN}}\n{"event": "lo')
    records = read_metrics(path)
    assert len(records) == 1 and np.isnan(records[0]["metrics"]["ldm/loss"])


@pytest.mark.parametrize("value,expected", [(np.float32(2.5), 2.5), (torch.tensor(3), 3), ("x", "x")])
def test_local_tracker_stores_plain_json(tmp_path, value, expected):
    tracker = LocalTracker(tmp_path, "ldm")
    tracker.log({"m": value}, step=1)
    assert read_metrics(tmp_path / METRICS_FILE)[1]["metrics"]["m"] == expected
