"""A pipeline over in-memory parts (training grids, checkpoints, benchmarks) and the export writer.

An export is a diffusers `save_pretrained` folder plus `users.json`, `sampler.json` (the sampler settings the
model was trained with and its training noise-scheduler config, which ldm-sample and ldm-eval default to) and
`training_config.yaml` (the resolved training config: what ldm-eval names, tags and judges an export by when it is
evaluated away from its run dir).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm_users import io
from ldm_users.pipeline import UserDenoiser, UserLDMPipeline

SAMPLER_FILE = "sampler.json"
TRAINING_CONFIG_FILE = "training_config.yaml"


def make_pipeline(vae, denoiser: UserDenoiser, scheduler, users: list[str]) -> UserLDMPipeline:
    """A pipeline sharing the given modules (no copies): a UNet goes in the `unet` slot with its user encoder,
    transformers in the `transformer` slot."""
    slot = "unet" if denoiser.kind == "unet" else "transformer"
    return UserLDMPipeline(vae=vae, scheduler=scheduler, user_encoder=denoiser.condition, user_names=users,
                           **{slot: denoiser.backbone})


def export_pipeline(pipe: UserLDMPipeline, out_dir: Path, sampler_cfg: DictConfig, noise_scheduler_config,
                    training_config: DictConfig | None = None) -> Path:
    """diffusers layout (vae/, unet/ or transformer/, user_encoder/, scheduler/, model_index.json) + users.json +
    sampler.json, written to a temporary folder and renamed into place."""
    with io.atomic_path(out_dir, directory=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        io.write_json(tmp / "users.json", {"users": pipe.user_names})
        io.write_json(tmp / SAMPLER_FILE, {"sampler": OmegaConf.to_container(sampler_cfg, resolve=True),
                                           "noise_scheduler": dict(noise_scheduler_config)})
        if training_config is not None:
            (tmp / TRAINING_CONFIG_FILE).write_text(OmegaConf.to_yaml(training_config, resolve=True))
    return Path(out_dir)
