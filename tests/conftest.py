"""Shared fixtures: an isolated cache and output root, and one tiny trained run."""

from __future__ import annotations

import os
from pathlib import Path

# Set before anything imports wandb or diffusers (hence before the imports below): no network, no writes outside
# the test's folders.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs a worker per core) each worker and the processes its tests start use one
# thread: two workers of two threads each on two cores make OpenMP's waiting threads spin against each other, which
# is slower than one test after the other. Set before torch is imported, and inherited by the tests' subprocesses
# (tests comparing an in-process run with a fresh process need the same count in both).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ldm_users.cli.train import run  # noqa: E402
from tests.helpers import hydra_job  # noqa: E402


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ldm_cache")
    os.environ["LDM_USERS_CACHE"] = str(path)
    return path


@pytest.fixture(autouse=True)
def _isolated_env(session_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_USERS_CACHE", str(session_cache))
    monkeypatch.setenv("LDM_USERS_OUTPUT", str(tmp_path / "outputs"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    # A test that changes torch's thread count must not change later ones: the reduction order (and so the last
    # bits of a float) depends on it, and test_exact_resume compares an in-process run with a fresh process.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, session_cache):
    """One finished two-stage smoke run (VAE + tiny UNet + export), shared by tests that only read it. With the VAE's
    reconstruction metrics: their judge is the one the ldm-eval tests train on this data anyway. Its own VAE
    (vae_train.share=false): a job that reuses a VAE another test's job trained does not score it again."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    overrides = ("experiment=smoke", "logger=none", "vae_train.recon_metrics=true", "vae_train.share=false")
    with hydra_job(run_dir, *overrides) as cfg:
        result = run(cfg)
    return {"run_dir": run_dir, "export": Path(result["export"]), "cfg": cfg, "result": result}
