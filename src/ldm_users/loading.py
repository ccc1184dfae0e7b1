"""Load a trained model for sampling or evaluation from an export, a run dir or a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm_users.errors import ConfigError
from ldm_users.pipeline import UserLDMPipeline

SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def _load_checkpoint_pipeline(checkpoint: Path, use_ema: bool) -> UserLDMPipeline:
    from ldm_users.models.build import build_denoiser
    from ldm_users.training.checkpoint import load_tensors
    from ldm_users.training.ldm_stage import load_frozen_vae, make_pipeline

    cfg = OmegaConf.load(checkpoint / "config.yaml")
    users = json.loads((checkpoint / "users.json").read_text())["users"]
    vae_dir = Path(cfg.vae_path) if cfg.get("vae_path") else checkpoint.parents[2] / "vae" / "final"
    if not (vae_dir / "config.json").exists():
        raise ConfigError(f"checkpoint {checkpoint} needs its VAE, expected at {vae_dir}; sample from the run's "
                          f"export instead, or keep the run dir together.")
    denoiser = build_denoiser(cfg, users)
    weights = checkpoint / ("ema.safetensors" if use_ema and (checkpoint / "ema.safetensors").exists()
                            else "model.safetensors")
    state = load_tensors(weights)
    missing, unexpected = denoiser.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{weights} does not match the model in {checkpoint}/config.yaml "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]}).")
    return make_pipeline(load_frozen_vae(vae_dir, "cpu"), denoiser.eval(), instantiate(cfg.noise_scheduler), users)


def load_pipeline(model_path: str | Path, use_ema: bool = True) -> UserLDMPipeline:
    """An export dir, a run dir (its export/), or a checkpoint-<step> dir -> UserLDMPipeline on the CPU."""
    path = Path(model_path)
    if not path.exists():
        raise ConfigError(f"model_path={path} does not exist: give an export dir, a run dir or a checkpoint dir.")
    if (path / "export" / "model_index.json").exists():
        path = path / "export"
    if (path / "model_index.json").exists():
        return UserLDMPipeline.from_pretrained(str(path), use_safetensors=True)  # weights never from a pickle
    if (path / "trainer_state.json").exists() and (path / "config.yaml").exists():
        return _load_checkpoint_pipeline(path, use_ema)
    raise ConfigError(f"model_path={path} is neither an export (model_index.json), a run dir with export/, nor a "
                      f"checkpoint folder (trainer_state.json).")


def set_sampler(pipe: UserLDMPipeline, sampler_cfg) -> None:
    name = str(sampler_cfg.scheduler)
    if name not in SAMPLERS:
        raise ConfigError(f"sampler.scheduler={name}: use one of {', '.join(SAMPLERS)}.")
    pipe.scheduler = SAMPLERS[name].from_config(pipe.scheduler.config)


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    return dev, dt


def parse_users(users, pipe: UserLDMPipeline) -> list:
    if users in (None, "all"):
        return list(range(len(pipe.user_names)))
    if isinstance(users, (str, int)):
        users = [users]
    return list(users)
