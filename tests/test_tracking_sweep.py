"""Multirun: one W&B run per job in one group, a failed job marked failed without stopping the next,
the submitit local launcher, and ldm-report on a real tiny sweep. Multiruns run as subprocesses of the app."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from ldm_users import sweep
from ldm_users.errors import ConfigError
from ldm_users.tracking import METRICS_FILE, read_metrics
from tests.wandb_offline import history, inspect_records, inspect_summary, offline_runs, run_record


def _ldm_train(args: list[str], cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """`ldm-train ARGS` in a fresh interpreter (the same as the console script), optionally after `prelude`."""
    code = f"{prelude}\nimport sys\nfrom ldm_users.cli.train import main\nsys.argv = ['ldm-train', *{args!r}]\nmain()\n"
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()),
                  key=lambda p: int(p.name.split("_", 1)[0]))


def _status(job: Path) -> dict:
    return json.loads((job / "status.json").read_text())


# ---------------------------------------------------------------- in-process: run_job and the callback


def test_run_job_in_a_multirun_records_a_failure_and_returns(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sweep, "is_multirun", lambda: True)

    def crash(cfg):
        raise RuntimeError("out of cheese")

    def user_error(cfg):
        raise ConfigError("model=x: use model=y")

    with caplog.at_level(logging.ERROR, logger="ldm_users.sweep"):
        assert sweep.run_job(crash, None, tmp_path / "job0") is None
        assert sweep.run_job(user_error, None, tmp_path / "job1") is None
    assert sweep.run_job(lambda cfg: {"ok": 1}, None, tmp_path / "job2") == {"ok": 1}
    first, second, third = (_status(tmp_path / f"job{i}") for i in range(3))
    assert first["status"] == "failed" and first["error"] == "RuntimeError: out of cheese"
    assert "Traceback" in first["traceback"] and first["finished_at"] >= first["started_at"]
    assert second["error"] == "ConfigError: model=x: use model=y" and third["status"] == "ok"
    crash_log, user_log = caplog.records
    assert "FAILED: RuntimeError: out of cheese" in crash_log.getMessage() and crash_log.exc_info
    assert "the sweep goes on" in user_log.getMessage() and not user_log.exc_info  # no traceback for a user error

    def interrupted(cfg):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C still stops the sweep
        sweep.run_job(interrupted, None, tmp_path / "job3")
    assert _status(tmp_path / "job3")["status"] == "interrupted"


def test_run_job_in_a_single_run_records_then_raises(tmp_path):
    def user_error(cfg):
        raise ConfigError("bad")

    with pytest.raises(ConfigError):
        sweep.run_job(user_error, None, tmp_path)
    assert _status(tmp_path)["status"] == "failed"


def test_jobs_in_one_process_may_change_precision():
    from accelerate import Accelerator

    try:
        Accelerator(mixed_precision="no")
        sweep.reset_between_jobs()
        assert Accelerator(mixed_precision="bf16", gradient_accumulation_steps=4).gradient_accumulation_steps == 4
    finally:
        sweep.reset_between_jobs()  # leave the default state for the other tests of this process


def test_callback_exits_1_when_a_job_of_this_multirun_failed(tmp_path, capsys):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    old = {"job": 0, "status": "failed", "error": "from an earlier multirun", "started_at": 1.0}
    sweep.write_status(tmp_path / "0_old", old)
    callback = sweep.SweepStatusCallback()
    callback.on_multirun_start(config)
    for num, status in enumerate(["ok", "failed"]):
        sweep.write_status(tmp_path / f"{num}_job", {"job": num, "name": f"model=m{num}", "status": status,
                                                     "error": "E: x" if status == "failed" else None,
                                                     "started_at": time.time()})
    with pytest.raises(SystemExit) as exit_info:
        callback.on_multirun_end(config)
    assert exit_info.value.code == 1
    assert "1 of 2 jobs failed" in capsys.readouterr().err
    summary = json.loads((tmp_path / sweep.SWEEP_STATUS_FILE).read_text())
    assert summary["jobs"] == 2 and summary["failed"] == 1 and summary["statuses"][1]["error"] == "E: x"

    sweep.write_status(tmp_path / "1_job", {"job": 1, "status": "ok", "started_at": time.time()})
    callback.on_multirun_end(config)  # all ok: returns normally
    assert "all 2 jobs finished" in capsys.readouterr().out


def test_a_multirun_under_accelerate_launch_needs_a_shared_sweep_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    callback = sweep.SweepStatusCallback()
    with pytest.raises(SystemExit) as exit_info:
        callback.on_multirun_start(OmegaConf.create({"hydra": {"overrides": {"hydra": ["hydra.verbose=true"]}}}))
    assert exit_info.value.code == 2 and "hydra.sweep.dir=" in capsys.readouterr().err
    callback.on_multirun_start(OmegaConf.create({"hydra": {"overrides": {"hydra": [f"hydra.sweep.dir={tmp_path}"]}}}))


# ---------------------------------------------------------------- subprocess multiruns of tiny models


@pytest.mark.slow
def test_multirun_gives_one_wandb_run_per_job_in_one_group_and_a_report(tiny_run, tmp_path):
    sweep_dir = tmp_path / "size_sweep"
    vae = tiny_run["run_dir"] / "vae" / "final"  # one trained tiny VAE: the jobs train only their denoisers
    out = _ldm_train(["-m", "experiment=smoke", "model=unet_tiny,dit_tiny", "stage=ldm", f"vae_path={vae}",
                      "train.max_steps=4", "train.log_interval=2", "sampler.num_inference_steps=2",
                      f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = _job_dirs(sweep_dir)
    assert len(jobs) == 2 and len({j.name for j in jobs}) == 2

    runs = []
    for job, model in zip(jobs, ["unet_tiny", "dit_tiny"]):
        assert _status(job)["status"] == "ok"
        (wandb_dir,) = offline_runs(job)  # exactly one W&B run per job
        summary, records = inspect_summary(wandb_dir), inspect_records(wandb_dir)
        run = run_record(records)
        runs.append(run)
        assert summary["state"] == "finished" and summary["config"]["model"]["name"] == model
        assert f"+model-{model}+" in run["display_name"] and run["job_type"] == "train"
        assert f"model={model}" in run["tags"] and "experiment=smoke" in run["tags"]
        rows = history(records)
        assert [r["ldm/step"] for r in rows if "ldm/loss" in r] == [2, 4]
        first_log = next(r for r in rows if "ldm/loss" in r)
        assert {"ldm/lr", "ldm/grad_norm", "ldm/images_per_sec"} <= set(first_log)
        assert any(r.get("ldm/samples._type") == "image-file" for r in rows)
        assert summary["summary"]["params/denoiser"] > 0 and summary["summary"]["ldm/loss_smoothed"] > 0
        assert summary["config"]["params"]["denoiser"] == summary["summary"]["params/denoiser"]
    assert runs[0]["run_group"] == runs[1]["run_group"] == "smoke-size_sweep"
    assert runs[0]["display_name"] != runs[1]["display_name"]
    status = json.loads((sweep_dir / "sweep_status.json").read_text())
    assert status["jobs"] == 2 and status["failed"] == 0

    report = subprocess.run([sys.executable, "-m", "ldm_users.cli.report", str(sweep_dir)], capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    with open(sweep_dir / "report" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["unet_tiny", "dit_tiny"]  # one row per job
    for row, job in zip(rows, jobs):
        summary = inspect_summary(offline_runs(job)[0])["summary"]
        assert int(row["params_denoiser"]) == summary["params/denoiser"]  # the numbers W&B got
        assert float(row["final_loss"]) == pytest.approx(summary["ldm/loss_smoothed"])
        assert row["steps"] == "4" and row["status"] == "ok"
    assert rows[0]["params_denoiser"] != rows[1]["params_denoiser"]
    assert "| 0 | model=unet_tiny | ok |" in (sweep_dir / "report" / "report.md").read_text()
    with Image.open(sweep_dir / "report" / "loss_curves.png") as plot:
        plot.verify()


FAIL_FIRST_JOB = textwrap.dedent("""
    import ldm_users.training.vae_stage as vae_stage
    _train_vae = vae_stage.train_vae
    def train_vae(cfg, *args, **kwargs):  # a crash inside training, after the job's W&B run has started
        if cfg.model.name == "unet_tiny":
            raise RuntimeError("injected failure")
        return _train_vae(cfg, *args, **kwargs)
    vae_stage.train_vae = train_vae
""")


@pytest.mark.slow
def test_a_failed_job_is_marked_failed_and_the_next_job_still_runs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # vae_train.share=false: the second job must train the VAE itself, not reuse one from another test.
    out = _ldm_train(["-m", "experiment=smoke", "stage=vae", "model=unet_tiny,dit_tiny", "vae_train.max_steps=2",
                      "vae_train.share=false", "vae_train.log_interval=1", f"hydra.sweep.dir={sweep_dir}"], tmp_path,
                     prelude=FAIL_FIRST_JOB)
    assert out.returncode == 1, out.stderr[-3000:]  # non-zero at the end, not at the failure
    assert "1 of 2 jobs failed" in out.stderr and "injected failure" in out.stderr
    failed_job, ok_job = _job_dirs(sweep_dir)
    assert _status(failed_job)["status"] == "failed" and "injected failure" in _status(failed_job)["error"]
    assert _status(ok_job)["status"] == "ok" and (ok_job / "vae" / "final" / "config.json").exists()

    failed_run = inspect_summary(offline_runs(failed_job)[0])
    assert failed_run["state"] == "failed" and failed_run["exit_code"] == 1
    ok_records = inspect_records(offline_runs(ok_job)[0])
    assert inspect_summary(offline_runs(ok_job)[0])["state"] == "finished"
    assert [r["vae/step"] for r in history(ok_records) if "vae/loss" in r] == [1, 2]
    assert not any("vae/loss" in r for r in history(inspect_records(offline_runs(failed_job)[0])))
    last = read_metrics(failed_job / METRICS_FILE)[-1]
    assert last["event"] == "finish" and last["exit_code"] == 1


@pytest.mark.slow
def test_submitit_local_multirun_completes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'ldm-users[launchers]'")
    sweep_dir = tmp_path / "sweep"
    # logger=none: W&B in a job process is covered above; this checks the launcher and the per-job files.
    out = _ldm_train(["-m", "hydra/launcher=local", "experiment=smoke", "stage=vae", "model=unet_tiny,dit_tiny",
                      "logger=none", "vae_train.max_steps=2", "vae_train.share=false", "vae_train.log_interval=1",
                      f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in out.stdout + out.stderr
    jobs = _job_dirs(sweep_dir)
    assert len(jobs) == 2 and (sweep_dir / ".submitit").is_dir()  # each job ran in its own process
    groups = set()
    for job in jobs:
        assert _status(job)["status"] == "ok" and (job / "vae" / "final" / "config.json").exists()
        records = read_metrics(job / METRICS_FILE)
        groups.add(records[0]["group"])
        assert [r["step"] for r in records if r["event"] == "log"] == [1, 2]
        assert records[-1]["event"] == "finish" and records[-1]["exit_code"] == 0
    assert groups == {"smoke-sweep"}
    assert json.loads((sweep_dir / "sweep_status.json").read_text())["failed"] == 0


@pytest.mark.slow
def test_two_processes_write_one_run_dir_and_one_wandb_run(tmp_path):
    """What `accelerate launch --num_processes 2 -m ldm_users.cli.train ...` does, on CPU: torchrun + gloo."""
    env = {**os.environ, "WANDB_MODE": "offline", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    args = ["experiment=smoke", "model=unet_tiny", "vae_train.max_steps=2", "train.max_steps=2",
            "train.log_interval=1", "sampler.num_inference_steps=2"]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ldm_users.cli.train", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs" / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1  # each rank ran Hydra; the run dir comes from the overrides, the same on both
    records = read_metrics(runs[0] / METRICS_FILE)
    assert records[0]["system"]["world_size"] == 2
    assert [r["event"] for r in records].count("start") == 1  # rank 1 tracks nothing
    assert len(offline_runs(runs[0])) == 1 and _status(runs[0])["status"] == "ok"
    assert (runs[0] / "export" / "model_index.json").exists()
