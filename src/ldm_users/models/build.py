"""Build the VAE, the denoiser and the user encoder from the composed config (`_target_` + instantiate)."""

from __future__ import annotations

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from ldm_users.errors import ConfigError

from ldm_users.pipeline.denoiser import UserDenoiser
from ldm_users.pipeline.families import FAMILIES, Family, family_of, latent_size

# hardware.attention -> diffusers' attention-dispatch backend, for families (Flux) whose processors use it.
DISPATCH_BACKENDS = {"sdpa": "native", "eager": "_native_math", "xformers": "xformers"}


def model_family(cfg: DictConfig) -> Family:
    """The backbone family of `model.denoiser._target_`'s class (pipeline/families.py)."""
    return target_family(str(OmegaConf.select(cfg, "model.denoiser._target_", default="")))


def target_family(target: str) -> Family:
    """The backbone family of a `_target_`: its class name, or the classes it derives from."""
    try:
        return family_of(target)
    except ValueError:  # maybe a subclass of a known backbone: its class knows its bases
        try:
            return family_of(get_class(target))
        except (ImportError, ValueError):
            raise ConfigError(f"model.denoiser._target_={target} is not a known backbone: use "
                              f"{', '.join('diffusers.' + name for name in FAMILIES)} or a subclass "
                              f"(e.g. model=unet_medium).") from None


def latent_shape(cfg: DictConfig) -> tuple[int, int, int]:
    """(channels, height, width) of the VAE latents the denoiser works on, whatever the backbone's input layout
    (Flux's input is these latents packed into 2x2 patches)."""
    vae = cfg.vae.autoencoder
    size = latent_size(cfg.data.resolution, vae.down_block_types)
    return int(vae.latent_channels), size, size


def build_vae(cfg: DictConfig):
    return instantiate(cfg.vae.autoencoder, _convert_="all")


def set_attention(backbone, kind: str) -> None:
    """hardware.attention: sdpa (torch scaled-dot-product: flash / memory-efficient kernels on CUDA, diffusers'
    default), eager (the plain matmul-softmax reference), or xformers (when installed)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if not hasattr(backbone, "set_attn_processor"):
        return
    if family_of(backbone).attention_dispatch:  # its processors need the rotary embedding: choose their kernel
        if kind not in DISPATCH_BACKENDS:
            raise ConfigError(f"hardware.attention={kind}: use sdpa, eager or xformers.")
        if kind != "sdpa":  # sdpa is already its default
            backbone.set_attention_backend(DISPATCH_BACKENDS[kind])
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
    """The backbone and user encoder of `model`; what its family derives beyond the config's keys (e.g. a UNet's
    projection class embedding for model.condition.inject=time|both) is added here."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    denoiser_extra, condition_extra = model_family(cfg).build_kwargs(model)
    backbone = instantiate(cfg.model.denoiser, **denoiser_extra, _convert_="all")
    attention = OmegaConf.select(cfg, "hardware.attention", default=None)
    if attention:
        set_attention(backbone, str(attention))
    condition = None
    if cfg.model.get("condition") is not None:
        condition = instantiate(cfg.model.condition, user_names=user_names, **condition_extra, _convert_="all")
    return UserDenoiser(backbone, condition)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0
