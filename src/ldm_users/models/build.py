"""Build the VAE, the denoiser and the user encoder from the composed config (`_target_` + instantiate)."""

from __future__ import annotations

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from ldm_users.errors import ConfigError

from ldm_users.pipeline.denoiser import KINDS, UserDenoiser, kind_of


def model_kind(cfg: DictConfig) -> str:
    """"unet" | "dit" | "flux": the kind of `model.denoiser._target_`'s class (pipeline.denoiser.kind_of)."""
    target = str(OmegaConf.select(cfg, "model.denoiser._target_", default=""))
    try:
        return kind_of(target)
    except ValueError:  # maybe a subclass of a known backbone: its class knows its bases
        try:
            return kind_of(get_class(target))
        except (ImportError, ValueError):
            raise ConfigError(f"model.denoiser._target_={target} is not a known backbone: use "
                              f"{', '.join('diffusers.' + name for name in KINDS)} or a subclass "
                              f"(e.g. model=unet_medium).") from None


def build_vae(cfg: DictConfig):
    return instantiate(cfg.vae.autoencoder, _convert_="all")


def set_attention(backbone, kind: str) -> None:
    """hardware.attention: sdpa (torch scaled-dot-product: flash / memory-efficient kernels on CUDA, diffusers'
    default), eager (the plain matmul-softmax reference), or xformers (when installed)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if not hasattr(backbone, "set_attn_processor"):
        return
    if kind == "sdpa":
        backbone.set_attn_processor(AttnProcessor2_0())
    elif kind == "eager":
        backbone.set_attn_processor(AttnProcessor())
    elif kind == "xformers":
        try:
            backbone.enable_xformers_memory_efficient_attention()
        except Exception as err:  # not installed or no CUDA
            raise ConfigError(f"hardware.attention=xformers is not available here ({err}); use hardware.attention=sdpa.")
    else:
        raise ConfigError(f"hardware.attention={kind}: use sdpa, eager or xformers.")


def build_denoiser(cfg: DictConfig, user_names: list[str] | None = None) -> UserDenoiser:
    backbone = instantiate(cfg.model.denoiser, _convert_="all")
    attention = OmegaConf.select(cfg, "hardware.attention", default=None)
    if attention:
        set_attention(backbone, str(attention))
    condition = None
    if cfg.model.get("condition") is not None:
        condition = instantiate(cfg.model.condition, user_names=user_names, _convert_="all")
    return UserDenoiser(backbone, condition)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0
