"""Build the VAE, the denoiser and the user encoder from the composed config (`_target_` + instantiate)."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from ldm_users.models.denoiser import UserDenoiser


def build_vae(cfg: DictConfig):
    return instantiate(cfg.vae.autoencoder, _convert_="all")


def build_denoiser(cfg: DictConfig, user_names: list[str] | None = None) -> UserDenoiser:
    backbone = instantiate(cfg.model.denoiser, _convert_="all")
    condition = None
    if cfg.model.get("condition") is not None:
        condition = instantiate(cfg.model.condition, user_names=user_names, _convert_="all")
    return UserDenoiser(backbone, condition)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0
