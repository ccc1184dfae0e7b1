"""Load a trained model for sampling or evaluation from an export, a run dir or a checkpoint.

Exports are loaded with UserLDMPipeline.from_pretrained, which never imports the code shipped in the export's
folder; weights are only read from safetensors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from omegaconf import DictConfig, OmegaConf

from ldm_users.errors import ConfigError
from ldm_users import layout
from ldm_users.inference.export import make_pipeline
from ldm_users.inference.samplers import adopt_recorded_sampler, make_scheduler, training_noise_scheduler, use_sampler
from ldm_users.io import read_tensors
from ldm_users.models.build import build_denoiser, latent_shape
from ldm_users.pipeline import UserLDMPipeline

log = logging.getLogger(__name__)


def resolve_export(path, key: str = "model_path") -> Path:
    """An export dir, a checkpoint dir, or a run dir (-> its export/). `key` names the setting in errors."""
    path = Path(str(path))
    if not path.exists():
        raise ConfigError(f"{key}={path} does not exist: give an export dir, a run dir or a checkpoint dir.")
    if layout.is_export(layout.export_dir(path)):
        return layout.export_dir(path)
    return path


def load_frozen_vae(vae_dir, device, dtype=torch.float32) -> AutoencoderKL:
    vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=dtype, use_safetensors=True)  # never a pickle
    return vae.to(device).eval().requires_grad_(False)


def training_config(model_path) -> DictConfig | None:
    """The config the model at `model_path` (an export, a run dir or a checkpoint) was trained with
    (layout.trained_config_file: the snapshot written during the run); None when nothing records it."""
    saved = layout.trained_config_file(resolve_export(model_path))
    return OmegaConf.load(saved) if saved is not None and saved.exists() else None


def recorded_sampling(model_path) -> tuple[DictConfig | None, dict | None]:
    """(the sampler settings the model was trained with, its training noise-scheduler config), each None when
    the export or checkpoint does not record it."""
    cfg = training_config(model_path)
    if cfg is None:
        return None, None
    sampler = cfg.get("sampler")
    # Runs from before the sampler group used `_target_` record `scheduler: ddim`: not reusable, skipped.
    usable = sampler is not None and isinstance(sampler.get("scheduler"), DictConfig)
    return (sampler if usable else None), dict(training_noise_scheduler(cfg).config)


def _load_checkpoint_pipeline(checkpoint: Path, use_ema: bool) -> UserLDMPipeline:
    cfg = OmegaConf.load(checkpoint / layout.CONFIG_FILE)
    users = json.loads((checkpoint / layout.USERS_FILE).read_text())["users"]
    # <run>/ldm/checkpoints/checkpoint-<step>: the run dir is three folders up
    vae_dir = Path(cfg.vae_path) if cfg.get("vae_path") else layout.vae_final(checkpoint.parents[2])
    if not (vae_dir / "config.json").exists():
        raise ConfigError(f"checkpoint {checkpoint} needs its VAE, expected at {vae_dir}; sample from the run's "
                          f"export instead, or keep the run dir together.")
    denoiser = build_denoiser(cfg, users)
    weights = checkpoint / (layout.EMA_FILE if use_ema and (checkpoint / layout.EMA_FILE).exists()
                            else layout.WEIGHTS_FILE)
    state = read_tensors(weights)
    missing, unexpected = denoiser.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{weights} does not match the model in {checkpoint}/config.yaml "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]}).")
    sampler, noise_config = recorded_sampling(checkpoint)
    # The run's sampler when it is recorded in today's form, else the training scheduler itself.
    scheduler = make_scheduler(sampler, noise_config) if sampler is not None else training_noise_scheduler(cfg)
    return make_pipeline(load_frozen_vae(vae_dir, "cpu"), denoiser.eval(), scheduler, users, latent_shape(cfg)[-1])


def load_pipeline(model_path, use_ema: bool = True, sampler: DictConfig | None = None) -> UserLDMPipeline:
    """An export dir, a run dir (its export/), or a checkpoint-<step> dir -> UserLDMPipeline on the CPU.

    With `sampler` (a sampler config), the pipeline samples with it over the model's training noise schedule;
    without, with the sampler the model was trained with.
    """
    path = resolve_export(model_path)
    if layout.is_export(path):
        pipe = UserLDMPipeline.from_pretrained(path)  # builds components from installed code only
    elif layout.is_checkpoint(path):
        pipe = _load_checkpoint_pipeline(path, use_ema)
    else:
        raise ConfigError(f"model_path={path} is neither an export (model_index.json), a run dir with export/, nor "
                          f"a checkpoint folder (trainer_state.json).")
    if sampler is not None:
        noise_config = recorded_sampling(path)[1] or pipe.scheduler.config
        use_sampler(pipe, sampler, noise_config)
    return pipe


def adopt_run_sampler(cfg: DictConfig, model_path, overrides: list[str]) -> bool:
    """cfg.sampler := the sampler settings the model was trained with, except those the command line sets."""
    adopted = adopt_recorded_sampler(cfg, recorded_sampling(model_path)[0], overrides)
    if adopted:
        log.info("sampler settings of the run: %s", OmegaConf.to_container(cfg.sampler))
    return adopted


def parse_users(users, pipe: UserLDMPipeline) -> list:
    if users in (None, "all"):
        return list(range(len(pipe.user_names)))
    if isinstance(users, (str, int)):
        users = [users]
    return list(users)
