"""Which stage limits quality: reconstruction metrics (PSNR, SSIM, the judge's FD), the VAE stage's report,
ldm-eval's autoencoder ceiling and bottleneck line, the weak-judge verdict, and ldm-report's columns for them."""

from __future__ import annotations

import csv
import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm_users.cli.report import make_report
from ldm_users.evaluation import metrics as M
from ldm_users.evaluation.classifier import load_or_train
from ldm_users.evaluation.diagnosis import JUDGE_ADVICE, bottleneck, judge_verdict
from ldm_users.evaluation.evaluate import evaluate_export
from ldm_users.formatting import fmt
from ldm_users.evaluation.reconstruction import PSNR_CAP_DB, psnr, reconstruction_metrics, report_vae_stage, ssim
from ldm_users.tracking import METRICS_FILE, LocalTracker, read_metrics
from tests.helpers import compose

FAST = ["eval.images_per_user=2", "sampler.num_inference_steps=4", "eval.device=cpu"]


def test_psnr_and_ssim_of_an_image_with_itself_and_of_known_errors():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(psnr(x, x), torch.full((3,), PSNR_CAP_DB, dtype=torch.float64))
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    # A uniform error of 0.1 in a range of 2: 10 log10(2^2 / 0.1^2) dB.
    assert torch.allclose(psnr(x, x + 0.1), torch.full((3,), 10 * math.log10(400), dtype=torch.float64))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    little, much = ssim(x, x + 0.05 * noise), ssim(x, x + 0.5 * noise)
    assert (little > 0.99).all() and (much < little - 0.2).all()
    assert (ssim(x, -x) < 0).all()  # anti-correlated structure


def test_ssim_follows_its_formula_on_a_single_window():
    """An 11 x 11 image is one window: SSIM is the formula on Gaussian-weighted means, variances and covariance of
    the intensities in [0, 1]."""
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 1, (1, 1, 11, 11)), rng.uniform(0, 1, (1, 1, 11, 11))
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mu_a, mu_b = (w * a).sum(), (w * b).sum()
    var_a, var_b = (w * a * a).sum() - mu_a ** 2, (w * b * b).sum() - mu_b ** 2
    cov = (w * a * b).sum() - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    assert float(ssim(torch.tensor(a) * 2 - 1, torch.tensor(b) * 2 - 1)) == pytest.approx(expected, rel=1e-4)


def test_the_bottleneck_rule_on_the_measured_datasets():
    # Faces at 32 px: the VAE loses most of it. Handwriting at 64 px: the VAE is near the real floor.
    stage, share, line = bottleneck(7.2, 39.7, 43.5)
    assert stage == "autoencoder" and share == pytest.approx(32.5 / 36.3) and line.startswith("bottleneck: auto")
    assert "43.5" in line and "39.7" in line and "7.2" in line and "\n" not in line
    assert bottleneck(17.5, 23.0, 40.0)[:2] == ("denoiser", pytest.approx(5.5 / 22.5))
    assert bottleneck(7.0, 9.0, 10.0)[0] == "neither"  # within 1.5x of the real floor
    assert bottleneck(7.0, 50.0, 40.0)[0] == "autoencoder"  # a ceiling above the generated FD
    assert bottleneck(None, 9.0, 10.0)[0] is None


def test_the_weak_judge_verdict():
    assert judge_verdict(0.138, 1 / 40) == (False, pytest.approx((0.138 - 0.025) / 0.975))  # handwriting, 40 writers
    assert judge_verdict(0.844, 1 / 40)[0] is True
    assert judge_verdict(0.6, 0.25)[0] is False and judge_verdict(0.65, 0.25)[0] is True  # 4 users: >= 0.625
    assert judge_verdict(None, 0.25) == (None, None)


@pytest.fixture(scope="module")
def judge(session_cache):
    from ldm_users.data.loading import prepare_dataset

    cfg = compose("experiment=smoke", "logger=none")
    dataset = prepare_dataset(cfg, show_progress=False)
    clf = load_or_train(dataset, OmegaConf.to_container(cfg.eval.classifier), cfg.paths.cache_dir,
                        torch.device("cpu"), show_progress=False)
    return dataset, clf


class IdentityAutoencoder(torch.nn.Module):
    """A lossless autoencoder: the latent is the image."""

    dtype = torch.float32

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z):
        return SimpleNamespace(sample=z)


@pytest.mark.slow  # trains the (cached) judge
def test_a_lossless_autoencoder_scores_the_real_floor(judge):
    dataset, clf = judge
    scores = reconstruction_metrics(IdentityAutoencoder(), clf, dataset, torch.device("cpu"))
    held = np.asarray(clf.meta["holdout_indices"])
    assert scores["images"] == len(held) == 12
    assert scores["psnr"] == PSNR_CAP_DB and scores["ssim"] == pytest.approx(1.0, abs=1e-6)
    floor = M.frechet_distance_features(clf.real_features[held], clf.real_features)
    assert scores["fd_classifier"] == pytest.approx(floor, rel=1e-6)
    assert scores["top1"] == clf.meta["holdout_top1"]


@pytest.mark.slow  # trains the (cached) judge
def test_the_vae_stage_report_line_summary_and_switch(judge, tmp_path, caplog):
    dataset, clf = judge
    cfg = compose("experiment=smoke", "logger=none", "vae_train.recon_metrics=true")
    tracker = LocalTracker(tmp_path, "vae")
    with caplog.at_level(logging.INFO, logger="ldm_users"):
        summary = report_vae_stage(cfg, IdentityAutoencoder(), dataset, torch.device("cpu"), tracker)
    assert tracker.summary == summary and summary["vae/recon_seen_in_training"] is True
    assert summary["vae/recon_psnr"] == PSNR_CAP_DB and summary["vae/recon_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert summary["vae/recon_fd_classifier"] == pytest.approx(summary["vae/recon_fd_real_floor"], rel=1e-6)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("VAE reconstructions"))
    floor = summary["vae/recon_fd_real_floor"]
    assert "seen in training" in line and "PSNR 100 dB, SSIM 1," in line and f"FD {floor:.3g} " in line
    off = compose("experiment=smoke", "logger=none")  # the preset leaves it off (vae_train.recon_metrics=false)
    assert report_vae_stage(off, IdentityAutoencoder(), dataset, torch.device("cpu"), tracker) == {}


@pytest.mark.slow  # the shared tiny trained run
def test_the_vae_stage_reports_its_reconstructions(tiny_run):
    records = read_metrics(tiny_run["run_dir"] / METRICS_FILE)
    summary = {k: v for r in records if r.get("event") == "summary" for k, v in r["summary"].items()}
    assert summary["vae/recon_seen_in_training"] is True and summary["vae/recon_images"] == 12
    assert 5.0 < summary["vae/recon_psnr"] < PSNR_CAP_DB  # 30 steps: lossy, but not noise
    assert 0.0 < summary["vae/recon_ssim"] < 1.0
    assert summary["vae/recon_fd_classifier"] > 0 and summary["vae/recon_fd_real_floor"] >= 0
    assert 0.0 <= summary["vae/recon_top1"] <= 1.0 and summary["vae/recon_kid_classifier"] is not None


@pytest.mark.slow  # two evaluations of the tiny export (a few seconds each), one by an untrained judge
def test_ldm_eval_reports_the_ceiling_the_bottleneck_and_a_weak_judge(tiny_run, tmp_path, caplog):
    sweep = tmp_path / "sweep"
    cfg = compose("experiment=smoke", "logger=none", *FAST)
    with caplog.at_level(logging.INFO, logger="ldm_users"):
        good = evaluate_export(cfg, tiny_run["export"], sweep / "0_default", show_progress=False)
    assert good["judge/reliable"] is True and good["judge/advice"] is None and "weak judge" not in caplog.text
    for key in ("psnr", "ssim", "fd_classifier", "kid_classifier", "top1"):
        assert isinstance(good[f"ceiling/{key}"], float), key
    assert good["ceiling/images"] == good["classifier/holdout_images"] == 12
    assert good["bottleneck/stage"] in ("autoencoder", "denoiser", "neither")
    assert good["bottleneck/line"].startswith("bottleneck: ") and good["bottleneck/line"] in caplog.text
    # The VAE stage scored the same images with the same judge: its figure is the ceiling.
    records = read_metrics(tiny_run["run_dir"] / METRICS_FILE)
    summary = {k: v for r in records if r.get("event") == "summary" for k, v in r["summary"].items()}
    assert good["ceiling/fd_classifier"] == pytest.approx(summary["vae/recon_fd_classifier"], rel=1e-4)
    assert good["ceiling/psnr"] == pytest.approx(summary["vae/recon_psnr"], rel=1e-6)

    caplog.clear()
    # An untrained judge (the synthetic users are told apart after a single step of a trained one).
    weak_cfg = compose("experiment=smoke", "logger=none", *FAST, "eval.classifier.steps=1", "eval.classifier.lr=0")
    with caplog.at_level(logging.INFO, logger="ldm_users"):
        weak = evaluate_export(weak_cfg, tiny_run["export"], sweep / "1_weak_judge", show_progress=False)
    assert weak["classifier/holdout_top1"] < 0.625  # 4 users: less than half the way from chance to perfect
    assert weak["judge/reliable"] is False and weak["judge/advice"] == JUDGE_ADVICE
    assert "weak judge" in caplog.text and "eval.inception_weights" in caplog.text
    assert json.loads((sweep / "1_weak_judge" / "metrics.json").read_text())["judge/reliable"] is False

    report = make_report([sweep])["markdown"].read_text()
    header = next(line for line in report.splitlines() if line.startswith("| job"))
    assert "ceiling FD (VAE)" in header and "real FD (floor)" in header and "bottleneck" in header
    assert "judge reliable" in header
    weak_line = next(line for line in report.splitlines() if line.startswith("Weak judge"))
    assert weak_line.startswith("Weak judge for job(s) 1 (") and ", 0 (" not in weak_line  # the weak one only
    assert f"held-out top-1 {fmt(weak['classifier/holdout_top1'], 3)}" in weak_line
    assert "mean little" in weak_line and "eval.classifier.steps" in weak_line


def test_the_report_carries_the_ceiling_the_bottleneck_and_the_weak_judge(tmp_path):
    def job(name, reliable, ceiling):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({
            "user_acc/top1": 0.8, "user_acc/chance": 0.025, "fd/classifier": 40.0, "ceiling/fd_classifier": ceiling,
            "fd/classifier_real_holdout": 17.5, "bottleneck/stage": "denoiser", "bottleneck/line": "bottleneck: ...",
            "classifier/holdout_top1": 0.138 if not reliable else 0.9, "judge/reliable": reliable,
            "judge/advice": None if reliable else JUDGE_ADVICE}))

    job("0_photos", True, 23.0)
    job("1_handwriting", False, 23.5)
    tracker = LocalTracker(tmp_path / "0_photos", "all")  # the VAE stage's own figures, from its run summary
    tracker.set_summary({"vae/recon_psnr": 24.51, "vae/recon_ssim": 0.8, "vae/recon_fd_classifier": 22.9})
    tracker.finish(0)
    result = make_report([tmp_path])
    lines = result["markdown"].read_text().splitlines()
    header = next(line for line in lines if line.startswith("| job"))
    assert "| fd/classifier | ceiling FD (VAE) | real FD (floor) | bottleneck | judge reliable |" in header
    assert "| VAE recon PSNR (dB) | VAE recon FD |" in header
    assert any(line.startswith("| 0 |") and "| 24.51 | 22.9 |" in line for line in lines)
    assert any(line.startswith("| 0 |") and "| 23 | 17.5 | denoiser | yes |" in line for line in lines)
    assert any(line.startswith("| 1 |") and "| 23.5 | 17.5 | denoiser | no |" in line for line in lines)
    weak = [line for line in lines if line.startswith("Weak judge")]
    assert len(weak) == 1 and weak[0].startswith("Weak judge for job(s) 1 (") and "held-out top-1 0.138" in weak[0]
    assert JUDGE_ADVICE in weak[0]
    with open(result["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["ceiling/fd_classifier"] for r in rows] == ["23.0", "23.5"]
    assert [r["judge/reliable"] for r in rows] == ["True", "False"]
    assert [r["vae_recon_ssim"] for r in rows] == ["0.8", ""]
