"""ldm-eval end to end on the tiny trained export, the guidance sweep, and ldm-train's eval.enabled hook."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm_users.cli.train import run
from ldm_users.config import compose as compose_any
from ldm_users.errors import ConfigError
from ldm_users.evaluation.evaluate import evaluate_export
from ldm_users.evaluation.inception import FIDInceptionV3
from ldm_users.evaluation.provenance import adopt_trained_settings
from ldm_users.inference.loading import resolve_export
from tests.helpers import REPO, compose, hydra_job

TINY_DATA = ["data.num_users=4", "data.images_per_user=16", "data.resolution=32"]  # what experiment=smoke trains on
FAST = ["eval.images_per_user=2", "sampler.num_inference_steps=4", "eval.device=cpu"]

# Every field metrics.json promises (per-user fields are checked separately).
FIELDS = [
    "export_path", "sampler", "guidance_scale", "num_inference_steps", "eta", "images_per_user", "seed", "num_users",
    "dataset", "data_name", "resolution",
    "user_acc/top1", "user_acc/top5", "user_acc/top5_k", "user_acc/chance", "confusion/top_pairs",
    "classifier/holdout_top1", "classifier/holdout_top5", "classifier/train_top1", "classifier/holdout_images",
    "classifier/train_images", "classifier/cache_dir", "oracle/top1", "oracle/real_holdout_top1",
    "fd/classifier", "fd/classifier_real_holdout", "fd/classifier_per_user_mean", "kid/classifier",
    "kid/classifier_std", "fd/inception", "fd/inception_real_images", "inception_weights",
    "diversity/generated", "diversity/real", "diversity/ratio", "diversity/min_ratio", "diversity/min_ratio_user",
    "diversity/pixel_ratio", "memorization/nn_dist_generated", "memorization/nn_dist_real", "memorization/ratio",
    "grid", "eval_seconds",
    "ceiling/psnr", "ceiling/ssim", "ceiling/fd_classifier", "ceiling/kid_classifier", "ceiling/top1", "ceiling/images",
    "bottleneck/stage", "bottleneck/autoencoder_share", "bottleneck/line", "judge/reliable", "judge/skill",
    "judge/advice",
]
PER_USER = ["top1", "top5", "fd", "diversity_ratio", "pixel_diversity_ratio", "oracle_top1"]


def _random_inception(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in FIDInceptionV3().state_dict().items()}, path)
    return path


def _check_metrics(metrics: dict, guidance: float, export: Path):
    missing = [k for k in FIELDS if k not in metrics]
    assert not missing, f"metrics.json lacks {missing}"
    for u in range(4):
        for field in PER_USER:
            assert f"per_user/user_{u:02d}/{field}" in metrics
    assert all(not isinstance(v, (dict, list)) for v in metrics.values())  # flat: one table column per key
    assert metrics["guidance_scale"] == guidance and metrics["num_inference_steps"] == 4
    assert Path(metrics["export_path"]) == export.resolve()
    assert metrics["num_users"] == 4 and metrics["images_per_user"] == 2 and metrics["user_acc/chance"] == 0.25
    assert 0.0 <= metrics["user_acc/top1"] <= metrics["user_acc/top5"] <= 1.0
    assert metrics["classifier/holdout_top1"] >= 0.9  # the judge itself is trustworthy
    assert metrics["oracle/real_holdout_top1"] == 1.0
    for key in ("fd/classifier", "kid/classifier", "diversity/ratio", "memorization/ratio", "fd/inception"):
        assert isinstance(metrics[key], float), key


@pytest.mark.slow
def test_ldm_eval_guidance_sweep_end_to_end(tiny_run, tmp_path):
    weights = _random_inception(tmp_path / "pt_inception-random.pth")
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "ldm_users.cli.eval", "-m", f"export_path={tiny_run['run_dir']}", "logger=none",
           *TINY_DATA, *FAST, f"eval.inception_weights={weights}", "eval.max_real_images=4",
           "sampler.guidance_scale=1,3", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=os.environ.copy(), capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").exists())
    assert len(jobs) == 2 and jobs[0].name.startswith("0_") and jobs[1].name.startswith("1_")
    assert "+sampler.guidance_scale-1+" in jobs[0].name and "+sampler.guidance_scale-3+" in jobs[1].name
    results = [json.loads((job / "metrics.json").read_text()) for job in jobs]
    for job, metrics, guidance in zip(jobs, results, (1.0, 3.0)):
        _check_metrics(metrics, guidance, tiny_run["export"])
        assert metrics["inception_weights"] == str(weights) and metrics["fd/inception_real_images"] == 4
        grid = Image.open(job / "grid.png")
        assert grid.height >= 4 * 32 and grid.width >= (2 + 2) * 32  # 4 users x (2 generated | 2 real)
    # One judge for the whole sweep: trained by the first job, read from the cache by the second.
    assert results[0]["classifier/cache_dir"] == results[1]["classifier/cache_dir"]
    assert "user classifier: cached in" in proc.stdout + proc.stderr  # Hydra logs to stdout
    # Same seed, same starting noise: only the guidance differs, and it shows.
    assert results[0]["fd/classifier"] != results[1]["fd/classifier"]


@pytest.mark.slow
def test_ldm_train_evaluates_the_export_when_enabled(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], run_dir)  # resumes at its last step: no training, export + eval only
    with hydra_job(run_dir, "experiment=smoke", "logger=none", "eval.enabled=true", *FAST) as cfg:
        result = run(cfg)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert result["eval"]["user_acc/top1"] == metrics["user_acc/top1"]
    assert result["summary"]["eval/user_acc/top1"] == metrics["user_acc/top1"]
    assert result["summary"]["eval/fd/classifier"] == metrics["fd/classifier"]
    assert (run_dir / "eval" / "grid.png").exists()


@pytest.mark.slow
def test_data_that_does_not_match_the_model_is_a_clear_error(tiny_run, tmp_path):
    cfg = compose("experiment=smoke", "logger=none", "data.num_users=5", *FAST)
    with pytest.raises(ConfigError, match="data.num_users"):
        evaluate_export(cfg, tiny_run["export"], tmp_path / "eval", show_progress=False)
    cfg = compose("experiment=smoke", "logger=none", *FAST, "eval.images_per_user=1")
    with pytest.raises(ConfigError, match="eval.images_per_user=1"):
        evaluate_export(cfg, tiny_run["export"], tmp_path / "eval", show_progress=False)


def test_eval_config_and_the_run_data_settings(tmp_path):
    cfg = compose_any(["export_path=x"], config_name="eval")
    assert {"data", "sampler", "paths", "logger", "eval"} <= set(cfg)
    assert "hardware" not in cfg  # what the model was trained on comes from its run, not an eval default
    assert cfg.eval == compose("experiment=smoke").eval  # one group, shared with ldm-train
    assert compose().eval.enabled is False and compose("experiment=smoke").eval.enabled is False

    run_dir = tmp_path / "run"
    (run_dir / "export").mkdir(parents=True)
    (run_dir / "export" / "model_index.json").write_text("{}")
    (run_dir / ".hydra").mkdir()
    saved = OmegaConf.create({"data": {"name": "synthetic", "num_users": 7, "images_per_user": 9, "resolution": 48,
                                       "root": "${paths.cache_dir}/synthetic/u${data.num_users}"},
                              "model": {"name": "unet_tiny"}, "hardware": {"name": "cpu"}})
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_export(tmp_path / "nowhere")
    export = resolve_export(run_dir)
    assert export == run_dir / "export"

    adopt_trained_settings(cfg, export, ["data.num_users=3"])  # the command line wins for data
    assert cfg.data.num_users == 31 and cfg.model.name == "unet_tiny" and cfg.hardware.name == "cpu"
    adopt_trained_settings(cfg, export, ["sampler.guidance_scale=2"])
    assert cfg.data.num_users == 7 and cfg.data.resolution == 48
    assert cfg.data.root == f"{cfg.paths.cache_dir}/synthetic/u7"  # interpolations resolve in the eval config
    # A run saved before data.generate existed still gets its generator, with the run's settings.
    assert cfg.data.generate.num_users == 7 and cfg.data.generate.root == cfg.data.root


def test_console_script_is_declared():
    assert 'ldm-eval = "ldm_users.cli.eval:main"' in (REPO / "pyproject.toml").read_text()
