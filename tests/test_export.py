"""An export is a diffusers custom pipeline anyone with diffusers can load, with a model card whose snippet runs;
ldm-users' own loaders never run the code it carries."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from omegaconf import OmegaConf
from PIL import Image

from ldm_users.errors import ConfigError
from ldm_users.inference.export import export_pipeline, make_pipeline, write_model_card
from ldm_users.inference.loading import adopt_run_sampler, load_pipeline
from ldm_users.inference.samplers import make_scheduler, training_noise_scheduler
from ldm_users.models.build import build_denoiser, build_vae, latent_shape
from ldm_users.pipeline import UserLDMPipeline
from tests.helpers import REPO, compose

CHILD = REPO / "tests" / "diffusers_only_child.py"
SHIPPED = ["pipeline_user_ldm.py", "denoiser.py", "families.py", "flux.py", "condition.py", "user_encoder/condition.py"]
CALL = {"users": ["user_00", "user_01"], "num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "np"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Random-weight tiny UNet, DiT and Flux pipelines, exported (with a sample grid) as ldm-train exports them."""
    out = {}
    for model in ("unet_tiny", "dit_tiny", "flux_tiny"):
        cfg = compose("experiment=smoke", f"model={model}")
        torch.manual_seed(0)
        users = [f"user_{i:02d}" for i in range(int(cfg.data.num_users))]
        noise = training_noise_scheduler(cfg).config
        pipe = make_pipeline(build_vae(cfg).eval(), build_denoiser(cfg, users).eval(),
                             make_scheduler(cfg.sampler, noise), users, latent_shape(cfg)[-1])
        folder = tmp_path_factory.mktemp(model)
        grid = folder / "grid.png"
        Image.new("RGB", (64, 32), "red").save(grid)
        out[model] = export_pipeline(pipe, folder / "export", cfg, grid)
    return out


def run_without_ldm_users(script: str, cwd: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(script)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-I", str(CHILD), str(path), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_export_is_a_diffusers_custom_pipeline_with_a_model_card(exports):
    unet = exports["unet_tiny"]
    index = json.loads((unet / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_user_ldm", "UserLDMPipeline"]
    assert index["user_encoder"] == ["condition", "UserConditionEncoder"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    source = REPO / "src" / "ldm_users" / "pipeline"
    for name in SHIPPED:  # verbatim copies of the package's files
        assert (unet / name).read_bytes() == (source / Path(name).name).read_bytes(), name
    dit_index = json.loads((exports["dit_tiny"] / "model_index.json").read_text())
    assert dit_index["user_encoder"] == [None, None] and not (exports["dit_tiny"] / "user_encoder").exists()

    card = ModelCard.load(unet / "README.md")  # what the Hub reads
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.license == "mit" and not card.data.eval_results  # no evaluation yet
    assert {"unet", "UNet2DConditionModel", "unet_tiny"} <= set(card.data.tags)
    assert "![one row per user](samples.png)" in card.text and (unet / "samples.png").exists()
    assert "| 3 | `user_03` |" in card.text and "| prediction type | v_prediction |" in card.text
    assert "## Evaluation" not in card.text and "W&B run" not in card.text  # trained without W&B
    write_model_card(unet, {"user_acc/top1": 0.875, "fd/classifier": 1.23456, "sampler": "ddim",
                            "images_per_user": 4, "per_user/user_03/top1": 0.5})
    card = ModelCard.load(unet / "README.md")
    assert "## Evaluation" in card.text and "| user accuracy (top-1) | 0.875 |" in card.text
    assert "| 3 | `user_03` | 0.5 |" in card.text  # each user's own accuracy
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}  # the Hub's evaluation results
    assert results == {"user accuracy (top-1)": 0.875, "Fréchet distance (classifier features)": 1.23}
    (unet.parent / "wandb_run.json").write_text('{"id": "abc123", "url": "https://wandb.ai/me/ldm-users/runs/abc123"}')
    write_model_card(unet)  # in a run dir tracked by W&B (RUN_ID_FILE): the card links the run
    link = "| W&B run | [ldm-users/abc123](https://wandb.ai/me/ldm-users/runs/abc123) |"
    assert link in (unet / "README.md").read_text()
    (unet.parent / "wandb_run.json").unlink()


def test_diffusers_alone_loads_the_export_and_makes_the_same_images(exports, tmp_path):
    script = f"""
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
for name, folder in zip(["unet", "dit", "flux"], sys.argv[1:]):
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(generator=torch.Generator().manual_seed(0), **{CALL!r}).images
    np.save(f"{{name}}.npy", images)
"""
    out = run_without_ldm_users(script, tmp_path, tmp_path, *(str(exports[m]) for m in ("unet_tiny", "dit_tiny",
                                                                                       "flux_tiny")))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Expected types" not in out.stderr  # diffusers' component type check is satisfied
    for name, folder in (("unet", exports["unet_tiny"]), ("dit", exports["dit_tiny"]), ("flux", exports["flux_tiny"])):
        remote = np.load(tmp_path / f"{name}.npy")
        ours = UserLDMPipeline.from_pretrained(folder)(generator=torch.Generator().manual_seed(0), **CALL).images
        np.testing.assert_array_equal(remote, ours)  # the shipped code is the pipeline, to the bit
    for name in ("unet", "flux"):
        images = np.load(tmp_path / f"{name}.npy")
        assert np.abs(images[0] - images[1]).max() > 0.05, name  # two users, two different images
    assert (exports["flux_tiny"] / "flux.py").exists()  # denoiser.py's sibling travels with it


def test_the_model_cards_snippet_runs_as_written(exports, tmp_path):
    export = shutil.copytree(exports["unet_tiny"], tmp_path / "export")
    snippet = re.search(r"```python\n(.*?)```", (export / "README.md").read_text(), re.S).group(1)
    out = run_without_ldm_users(snippet, export, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = (np.asarray(Image.open(export / f"user_0{i}.png"), dtype=float) for i in (0, 1))
    assert first.shape == (32, 32, 3) and np.abs(first - second).max() > 10


def trap(export: Path, marker: Path) -> None:
    """Replace the export's code by modules that leave `marker` when imported."""
    for name in SHIPPED:
        (export / name).write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")


def test_our_loaders_never_run_code_from_the_export(exports, tmp_path):
    export = shutil.copytree(exports["unet_tiny"], tmp_path / "export")
    marker = tmp_path / "code_ran"
    trap(export, marker)
    pipe = UserLDMPipeline.from_pretrained(export)
    assert len(pipe(**{**CALL, "num_inference_steps": 2}).images) == 2
    load_pipeline(tmp_path / "export", sampler=compose("sampler=euler").sampler)
    assert not marker.exists()
    # The trap is real: diffusers' loader, told to trust the folder, runs it.
    script = "from diffusers import DiffusionPipeline\nimport sys\nDiffusionPipeline.from_pretrained(sys.argv[1], " \
             "trust_remote_code=True)\n"
    run_without_ldm_users(script, tmp_path, tmp_path, str(export))
    assert marker.exists()


def test_a_tampered_training_config_cannot_name_code(exports, tmp_path):
    """ldm-sample and ldm-eval take the run's sampler and noise schedule from training_config.yaml: its `_target_`s
    may only name diffusers schedulers."""
    marker = tmp_path / "code_ran"
    payload = {"_target_": "builtins.exec", "_args_": [f"open({str(marker)!r}, 'a')"]}
    for key in ("sampler.scheduler", "noise_scheduler"):
        export = shutil.copytree(exports["unet_tiny"], tmp_path / key)
        saved = OmegaConf.load(export / "training_config.yaml")
        OmegaConf.update(saved, key, payload, merge=False)
        OmegaConf.save(saved, export / "training_config.yaml")
        cfg = compose("experiment=smoke")
        with pytest.raises(ConfigError, match="name a diffusers scheduler"):
            adopt_run_sampler(cfg, export, [])
            load_pipeline(export, sampler=cfg.sampler)
    assert not marker.exists()


@pytest.mark.slow
def test_ldm_sample_never_runs_code_from_the_export(exports, tmp_path):
    export = shutil.copytree(exports["unet_tiny"], tmp_path / "export")
    marker = tmp_path / "code_ran"
    trap(export, marker)
    out = subprocess.run([sys.executable, "-m", "ldm_users.cli.sample", f"model_path={export}", "num_images=1",
                          "sampler.num_inference_steps=2", f"hydra.run.dir={tmp_path / 'samples'}"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "samples" / "grid.png").exists() and not marker.exists()
