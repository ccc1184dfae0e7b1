"""What a tracked run is called and described by: its name, its sweep group, its tags, the machine it ran on."""

from __future__ import annotations

import copy
import functools
import os
import platform
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ldm_users.config import run_dir_name
from ldm_users.runtime import choice, hydra_config, is_multirun, override_dirname, world_size


def hardware_profile() -> dict:
    """What this job actually runs on (the hardware=... profile only says what it was sized for)."""
    return copy.deepcopy(_hardware_profile())


@functools.lru_cache(maxsize=1)
def _hardware_profile() -> dict:
    profile = {"python": platform.python_version(), "platform": platform.platform(), "host": platform.node(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "world_size": world_size(), "gpu_count": 0}
    for package in ("diffusers", "accelerate", "wandb"):
        try:
            profile[package] = __import__(package).__version__
        except Exception:
            pass
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        profile["gpu_count"] = count
        profile["gpus"] = []
        for i in range(count):
            props = torch.cuda.get_device_properties(i)
            profile["gpus"].append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 2),
                                    "capability": f"{props.major}.{props.minor}"})
    return profile


def run_name(cfg: DictConfig) -> str:
    """logger.run_name, else the run dir's name, made of the job's overrides (e.g. `hardware-gpu_8gb+model-unet_light`):
    distinct for each job of a sweep. Outside a Hydra app, or without overrides, the model and hardware it has."""
    if cfg.get("logger") is not None and cfg.logger.get("run_name"):
        return str(cfg.logger.run_name)
    overrides = override_dirname()
    if overrides:
        return run_dir_name(overrides)
    # ldm-eval's config has no model group: name the run by what it has.
    parts = [f"{key}-{cfg[key].name}" for key in ("model", "hardware") if cfg.get(key) is not None]
    return run_dir_name("+".join(parts))


def sweep_group(cfg: DictConfig) -> str | None:
    """logger.group, else in a multirun the sweep: `<experiment>-<sweep dir name>` (a timestamp by default),
    the same for every job of one multirun, whatever process or machine runs it, and new for the next one."""
    if cfg.get("logger") is not None and cfg.logger.get("group"):
        return str(cfg.logger.group)
    if not is_multirun():
        return None
    name = Path(str(hydra_config().sweep.dir)).name
    experiment = choice("experiment")
    if experiment and experiment not in name:
        name = f"{experiment}-{name}"
    return name


def run_tags(cfg: DictConfig, job_type: str) -> list[str]:
    tags = [str(t) for t in (cfg.logger.get("tags") or [])] if cfg.get("logger") is not None else []
    for key in ("model", "hardware", "vae"):
        node = cfg.get(key)
        if node is not None and node.get("name"):
            tags.append(f"{key}={node.name}")
    experiment = choice("experiment")
    if experiment:
        tags.append(f"experiment={experiment}")
    tags.append(job_type)
    return list(dict.fromkeys(t[:64] for t in tags))  # W&B caps tags at 64 characters


# Top-level config keys a W&B panel groups, filters and plots runs by (parallel coordinates over a model-size sweep:
# model, lr, batch, guidance -> loss, accuracy). The nested config is logged too; these save digging for the key.
_COMPARE = {"model": "model.name", "vae": "vae.name", "hardware": "hardware.name", "data": "data.name",
            "resolution": "data.resolution", "users": "data.num_users", "lr": "train.lr",
            "batch_per_device": "hardware.batch_size", "grad_accum": "hardware.gradient_accumulation_steps",
            "p_uncond": "train.p_uncond", "ema_decay": "train.ema.decay", "max_steps": "train.max_steps",
            "prediction_type": "train.prediction_type", "sampler": "sampler.name",
            "guidance_scale": "sampler.guidance_scale", "sampling_steps": "sampler.num_inference_steps"}


def compare_keys(cfg: DictConfig) -> dict:
    out = {}
    for name, key in _COMPARE.items():
        try:
            value = OmegaConf.select(cfg, key, default=None)
        except Exception:  # an interpolation that cannot resolve here (e.g. ${hydra:...} outside an app)
            value = None
        if value is not None:
            out[name] = value
    if "batch_per_device" in out:
        out["batch_global"] = int(out["batch_per_device"]) * int(out.get("grad_accum", 1)) * world_size()
    return out
