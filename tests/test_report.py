"""ldm-report on job dirs written the way the trainer (metrics.jsonl, status.json) and ldm-eval (metrics.json)
write them: one row per job, the right numbers in the right columns, and the plots."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from PIL import Image

from ldm_users.errors import DataError
from ldm_users.cli.report import make_report
from ldm_users.reporting.jobs import JobRow
from ldm_users.reporting.plots import fd_key
from ldm_users.tracking import METRICS_FILE, LocalTracker
from tests.helpers import compose


def _train_job(sweep, num, model, losses, params, rate, status="ok", error=None, peak=None):
    job = sweep / f"{num}_experiment=smoke,model={model}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- experiment=smoke\n- model={model}\n")
    tracker = LocalTracker(job, "all", compose("experiment=smoke", f"model={model}"))
    tracker.begin_stage("vae")
    tracker.log({"vae/loss": 0.4}, step=5)
    tracker.begin_stage("ldm")
    for step, loss in losses:
        tracker.log({"ldm/loss": loss, "ldm/images_per_sec": rate,
                     **({"ldm/peak_memory_gib": peak} if peak else {})}, step=step)
    if status == "ok":
        tracker.set_summary({"params/denoiser": params, "params/user_encoder": 7, "params/vae": 11})
    tracker.finish(0 if status == "ok" else 1)
    (job / "status.json").write_text(json.dumps({"job": num, "name": f"experiment=smoke,model={model}",
                                                 "overrides": ["experiment=smoke", f"model={model}"],
                                                 "status": status, "error": error}))
    return job


def test_report_of_a_training_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    _train_job(sweep, 1, "dit_tiny", [(10, 1.2), (20, 0.9)], 59888, 30.0, peak=1.5)
    job0 = _train_job(sweep, 0, "unet_tiny", [(10, 1.0), (20, 0.8)], 792964, 40.0)
    # Killed after logging step 20 but before its checkpoint and resumed from step 10 by a version that logged the
    # replayed steps again (today's trackers skip them): the later value of step 20 wins.
    with open(job0 / METRICS_FILE, "a") as f:
        f.write(json.dumps({"event": "log", "stage": "ldm", "step": 20, "metrics": {"ldm/loss": 0.7}}) + "\n")
    _train_job(sweep, 2, "unet_tiny", [(10, 1.1)], 792964, 40.0, status="failed", error="RuntimeError: boom")
    result = make_report([sweep])

    assert result["markdown"] == sweep / "report" / "report.md"
    with open(result["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2"]  # by job number, not by directory listing
    assert [r["model"] for r in rows] == ["unet_tiny", "dit_tiny", "unet_tiny"]
    assert rows[0]["params_denoiser"] == "792964" and rows[1]["params_denoiser"] == "59888"
    # The summary the tracker derived at finish: the mean of the last logged losses, the median images/s.
    assert float(rows[0]["final_loss"]) == pytest.approx(0.9) and float(rows[1]["images_per_sec"]) == 30.0
    assert rows[1]["peak_memory_gib"] == "1.5" and rows[0]["peak_memory_gib"] == ""
    assert rows[2]["status"] == "failed" and rows[2]["error"] == "RuntimeError: boom"
    assert float(rows[2]["final_loss"]) == 1.1  # a failed job: derived from what it logged
    assert rows[0]["steps"] == "20" and "guidance_scale" not in rows[0]

    markdown = result["markdown"].read_text()
    assert "Common overrides: `experiment=smoke`" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3  # header + one row per job
    assert table[1].startswith("| 0 | model=unet_tiny | ok | unet_tiny | cpu | 792,964 | 20 | 0.9 |")
    assert "- job 2 (`experiment=smoke,model=unet_tiny`): RuntimeError: boom" in markdown
    curves = {r.columns["job"]: r.curves["ldm"] for r in result["rows"]}
    assert curves[0] == [(10, 1.0), (20, 0.7)]  # the resumed run's value for step 20 wins
    with Image.open(result["loss_plot"]) as plot:
        assert plot.size[0] > 600 and plot.size[1] > 300
    assert result["eval_plot"] is None


def test_report_of_an_eval_sweep_over_guidance_scale(tmp_path):
    sweep = tmp_path / "eval_sweep"
    for num, (scale, acc, fd) in enumerate([(1.0, 0.55, 40.0), (2.0, 0.8, 35.5), (3.0, 0.9, 52.0)]):
        job = sweep / f"{num}_sampler.guidance_scale={scale}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "config.yaml").write_text(f"model:\n  name: unet_tiny\nsampler:\n  guidance_scale: {scale}\n")
        metrics = {"user_acc/top1": acc, "fd/classifier": fd, "num_images": 64,
                   "extra": {"kid": fd / 100}}  # nested: flattened
        if num == 0:
            metrics["guidance_scale"] = scale  # in metrics.json for one job, only in its config for the others
        (job / "metrics.json").write_text(json.dumps(metrics))
    result = make_report([sweep], tmp_path / "out")
    with open(result["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["guidance_scale"]) for r in rows] == [1.0, 2.0, 3.0]
    assert [float(r["user_acc/top1"]) for r in rows] == [0.55, 0.8, 0.9]
    assert [float(r["fd/classifier"]) for r in rows] == [40.0, 35.5, 52.0]
    assert float(rows[1]["extra/kid"]) == 0.355 and rows[0]["model"] == "unet_tiny"
    assert result["eval_plot"] == tmp_path / "out" / "eval.png" and result["eval_plot"].exists()
    assert result["loss_plot"] is None  # nothing was trained here
    markdown = result["markdown"].read_text()
    assert "eval.png" in markdown and "loss_curves" not in markdown
    assert "final loss" not in markdown  # no columns empty in every row
    # The headline metrics only; the rest (extra/kid, num_images) is in report.csv.
    assert "| model | guidance_scale | user_acc/top1 | fd/classifier |" in markdown and "extra/kid" not in markdown


def test_report_reads_ldm_evals_metrics(tmp_path):
    """Keys as ldm-eval writes them (evaluation/evaluate.py), in <run>/eval/ after ldm-train eval.enabled=true."""
    sweep = tmp_path / "sweep"
    job = _train_job(sweep, 0, "unet_tiny", [(10, 1.0)], 792964, 40.0)
    (job / "eval").mkdir()
    (job / "eval" / "metrics.json").write_text(json.dumps({
        "export_path": "/x/export", "sampler": "ddim", "guidance_scale": 3.0, "num_inference_steps": 10,
        "user_acc/top1": 0.75, "user_acc/chance": 0.25, "fd/classifier": 12.5, "fd/inception": None,
        "diversity/ratio": 0.9, "memorization/ratio": 1.1, "confusion/top_pairs": [["a", "b", 3]],
        "per_user/user_00/top1": 1.0, "grid": "/x/grid.png"}))
    result = make_report([sweep])
    with open(result["csv"]) as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["user_acc/top1"]) == 0.75 and float(row["fd/classifier"]) == 12.5
    assert float(row["guidance_scale"]) == 3.0 and row["num_inference_steps"] == "10"
    assert not any(k.startswith(("per_user", "confusion")) or k in ("grid", "fd/inception") for k in row)
    header = next(line for line in result["markdown"].read_text().splitlines() if line.startswith("| job"))
    assert "user_acc/top1" in header and "fd/classifier" in header and "num_inference_steps" not in header
    assert result["eval_plot"].exists()  # accuracy against FD(classifier), since FD(inception) is null


def test_fd_is_inception_when_computed_else_classifier():
    def job(**metrics):
        return JobRow(columns={}, evaluation=metrics)

    assert fd_key([job(**{"fd/classifier": 1.0}), job(**{"fd/inception": 2.0, "fd/classifier": 1.0})]) == "fd/inception"
    assert fd_key([job(**{"fd/classifier": 1.0})]) == "fd/classifier" and fd_key([job(loss=1.0)]) is None


def test_no_jobs_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no job dirs under"):
        make_report([tmp_path / "empty"])
    out = subprocess.run([sys.executable, "-m", "ldm_users.cli.report", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "is not a directory" in out.stderr and "Traceback" not in out.stderr


def test_a_size_sweep_gets_loss_accuracy_and_speed_against_parameters(tmp_path):
    sweep = tmp_path / "sweep"
    for num, (model, params, rate) in enumerate([("unet_tiny", 792964, 40.0), ("dit_tiny", 59888, 30.0)]):
        _train_job(sweep, num, model, [(10, 1.0 + num), (20, 0.8 + num)], params, rate)
    result = make_report([sweep])
    assert result["scaling_plot"] == sweep / "report" / "scaling.png" and result["scaling_plot"] in result["plots"]
    with Image.open(result["scaling_plot"]) as plot:
        assert plot.size[0] > 600
    one = tmp_path / "one"
    _train_job(one, 0, "unet_tiny", [(10, 1.0)], 792964, 40.0)
    assert make_report([one])["scaling_plot"] is None  # a single size: nothing to plot against
