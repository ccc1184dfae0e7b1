"""The VAE is trained once per sweep: its cache key, one training among concurrent jobs, and a real 2-model sweep."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ldm_users.tracking import METRICS_FILE, read_metrics
from ldm_users.tracking.base import NullTracker
from ldm_users.training import shared_vae
from tests.helpers import compose

DATASET = SimpleNamespace(fingerprint="abc123", resolution=32)


class Accelerator(SimpleNamespace):
    """What obtain_vae asks of accelerate's Accelerator, for one process."""

    def __init__(self, **kw):
        super().__init__(**{"num_processes": 1, "is_main_process": True, "gradient_accumulation_steps": 1,
                            "mixed_precision": "no", **kw})

    def wait_for_everyone(self):
        pass


def _key(*overrides: str) -> str:
    return shared_vae.vae_key(compose("experiment=smoke", *overrides), DATASET, Accelerator())[0]


def test_key_changes_with_what_trains_the_vae_and_not_with_the_rest():
    base = _key()
    assert base == _key()  # deterministic
    for changed in ("vae_train.lr=3e-4", "vae_train.max_steps=31", "seed=1", "vae.autoencoder.latent_channels=8",
                    "hardware.batch_size=2", "vae_train.kl_weight=1e-5"):
        assert _key(changed) != base, changed
    # The denoiser, its training, the cadence and the output places do not make another VAE.
    for same in ("model=dit_tiny", "train.lr=3e-3", "train.p_uncond=0.2", "vae_train.sample_interval=7",
                 "vae_train.save_interval=7", "logger=none", "vae_train.share=false", "paths.cache_dir=/elsewhere"):
        assert _key(same) == base, same
    cfg = compose("experiment=smoke")
    other_data = SimpleNamespace(fingerprint="other", resolution=32)
    assert shared_vae.vae_key(cfg, other_data, Accelerator())[0] != base
    assert shared_vae.vae_key(cfg, DATASET, Accelerator(mixed_precision="bf16"))[0] != base


def _fake_train(run_dir: Path, counter: Path, seconds: float):
    def train() -> Path:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(seconds)  # long enough for the other job to arrive while this one trains
        final = run_dir / "vae" / "final"
        final.mkdir(parents=True)
        (final / "config.json").write_text(json.dumps({"scaling_factor": 0.5}))
        (final / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
        return final

    return train


TRAIN_SECONDS = 4.0


def _job(cache: str, run_dir: str, counter: str, out: str) -> None:
    """One job of a parallel sweep: obtain the VAE, report the folder it got and what its summary says."""
    cfg = compose("experiment=smoke", f"paths.cache_dir={cache}")
    tracker = NullTracker()
    entered = time.time()
    folder = shared_vae.obtain_vae(cfg, Path(run_dir), DATASET, Accelerator(), tracker,
                                   train=_fake_train(Path(run_dir), Path(counter), TRAIN_SECONDS))
    Path(out).write_text(json.dumps({"folder": str(folder), "summary": tracker.summary, "entered": entered}))


def test_concurrent_jobs_train_one_vae_and_the_others_reuse_it(tmp_path):
    counter, cache = tmp_path / "trainings.txt", tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    jobs = [ctx.Process(target=_job, args=(str(cache), str(tmp_path / f"run{i}"), str(counter),
                                           str(tmp_path / f"out{i}.json"))) for i in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
        assert job.exitcode == 0
    assert len(counter.read_text().split()) == 1  # one training for both jobs
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    # Both jobs asked while one was training: the other waited on the lock instead of training too.
    assert abs(results[0]["entered"] - results[1]["entered"]) < TRAIN_SECONDS
    reused = [r for r in results if "vae/reused_from" in r["summary"]]
    assert len(reused) == 1
    entry = Path(reused[0]["summary"]["vae/reused_from"])
    assert entry.parent == cache / "vae" and shared_vae.is_complete(entry)
    for r in results:  # each run dir holds a complete VAE of its own
        folder = Path(r["folder"])
        assert folder.name == "final" and (folder / "diffusion_pytorch_model.safetensors").read_bytes() == b"weights"
        assert r["summary"]["vae/key"] == entry.name
    assert reused[0]["summary"]["vae/scaling_factor"] == 0.5

    # A later job reuses it too; share=false trains its own.
    cfg = compose("experiment=smoke", f"paths.cache_dir={cache}")
    shared_vae.obtain_vae(cfg, tmp_path / "run2", DATASET, Accelerator(), NullTracker(),
                          train=_fake_train(tmp_path / "run2", counter, 0))
    assert len(counter.read_text().split()) == 1
    cfg = compose("experiment=smoke", f"paths.cache_dir={cache}", "vae_train.share=false")
    shared_vae.obtain_vae(cfg, tmp_path / "run3", DATASET, Accelerator(), NullTracker(),
                          train=_fake_train(tmp_path / "run3", counter, 0))
    assert len(counter.read_text().split()) == 2


def test_a_failed_training_publishes_nothing_and_the_next_job_trains(tmp_path):
    cfg = compose("experiment=smoke", f"paths.cache_dir={tmp_path / 'cache'}")

    def crash() -> Path:
        raise RuntimeError("killed mid-training")

    with pytest.raises(RuntimeError):
        shared_vae.obtain_vae(cfg, tmp_path / "run0", DATASET, Accelerator(), NullTracker(), train=crash)
    assert not any((tmp_path / "cache" / "vae").glob("[!.]*"))  # no entry, only the lock file
    counter = tmp_path / "trainings.txt"
    folder = shared_vae.obtain_vae(cfg, tmp_path / "run1", DATASET, Accelerator(), NullTracker(),
                                   train=_fake_train(tmp_path / "run1", counter, 0))
    assert folder == tmp_path / "run1" / "vae" / "final" and len(counter.read_text().split()) == 1


def test_share_must_be_a_boolean(tmp_path):
    from ldm_users.errors import ConfigError

    cfg = compose("experiment=smoke", "vae_train.share=maybe")
    with pytest.raises(ConfigError, match="vae_train.share=maybe"):
        shared_vae.obtain_vae(cfg, tmp_path, DATASET, Accelerator(), NullTracker(), train=lambda: tmp_path)


@pytest.mark.slow
def test_a_two_model_sweep_trains_its_vae_once(tmp_path):
    sweep_dir = tmp_path / "sweep"
    cache = tmp_path / "cache"  # a fresh cache: no VAE of an earlier test to reuse
    code = "from ldm_users.cli.train import main; main()"
    args = ["-m", "experiment=smoke", "model=unet_tiny,dit_tiny", "logger=none", "vae_train.max_steps=4",
            "vae_train.log_interval=1", "train.max_steps=2", "sampler.num_inference_steps=2",
            f"paths.cache_dir={cache}",
            f"hydra.sweep.dir={sweep_dir}"]
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=lambda p: p.name)
    trained = read_metrics(first / METRICS_FILE)
    reused = read_metrics(second / METRICS_FILE)
    assert [r["step"] for r in trained if "vae/loss" in r.get("metrics", {})] == [1, 2, 3, 4]
    assert not any("vae/loss" in r.get("metrics", {}) for r in reused)  # the second job trained no VAE
    summary = {k: v for r in reused if r["event"] == "summary" for k, v in r["summary"].items()}
    entry = Path(summary["vae/reused_from"])
    assert entry.parent == cache / "vae" and summary["vae/trained_in"] == str(first)
    assert f"VAE: reusing {entry}" in (second / "train.log").read_text()
    # Both run dirs hold the same complete VAE, so sampling or resuming either needs no cache.
    for job in (first, second):
        weights = job / "vae" / "final" / "diffusion_pytorch_model.safetensors"
        assert weights.read_bytes() == (entry / weights.name).read_bytes()
        assert (job / "export" / "model_index.json").exists()
