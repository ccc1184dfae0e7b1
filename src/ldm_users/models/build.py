"""Build the VAE, the denoiser and the user encoder from the composed config (`_target_` + instantiate)."""

from __future__ import annotations

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from ldm_users.errors import ConfigError

from ldm_users.pipeline.denoiser import KINDS, UserDenoiser, kind_of

# hardware.attention -> diffusers' attention-dispatch backend, for models (Flux) whose processors use it.
FLUX_BACKENDS = {"sdpa": "native", "eager": "_native_math", "xformers": "xformers"}


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


def latent_shape(cfg: DictConfig) -> tuple[int, int, int]:
    """(channels, height, width) of the VAE latents the denoiser works on, whatever the backbone's input layout
    (Flux's input is these latents packed into 2x2 patches)."""
    from ldm_users.config import _latent_size

    vae = cfg.vae.autoencoder
    size = _latent_size(cfg.data.resolution, vae.down_block_types)
    return int(vae.latent_channels), size, size


def build_vae(cfg: DictConfig):
    return instantiate(cfg.vae.autoencoder, _convert_="all")


def set_attention(backbone, kind: str) -> None:
    """hardware.attention: sdpa (torch scaled-dot-product: flash / memory-efficient kernels on CUDA, diffusers'
    default), eager (the plain matmul-softmax reference), or xformers (when installed)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if not hasattr(backbone, "set_attn_processor"):
        return
    if kind_of(backbone) == "flux":  # its processors need the rotary embedding: choose their kernel instead
        if kind not in FLUX_BACKENDS:
            raise ConfigError(f"hardware.attention={kind}: use sdpa, eager or xformers.")
        if kind != "sdpa":  # sdpa is already its default
            backbone.set_attention_backend(FLUX_BACKENDS[kind])
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


def time_injection(cfg: DictConfig) -> tuple[dict, dict]:
    """(denoiser kwargs, condition kwargs) for a UNet whose user also goes into the timestep embedding
    (model.condition.inject=time|both): diffusers' projection class embedding, fed the encoder's pooled vector,
    as wide as model.condition.pooled_dim (default model.embed_dim). Derived here so the widths cannot disagree,
    and absent for inject=cross_attention so no unused weights exist (DDP refuses those)."""
    cond = cfg.model.get("condition")
    if cond is None or cond.get("inject", "cross_attention") == "cross_attention" or model_kind(cfg) != "unet":
        return {}, {}
    pooled_dim = int(cond.get("pooled_dim") or cfg.model.embed_dim)
    return ({"class_embed_type": "projection", "projection_class_embeddings_input_dim": pooled_dim},
            {"pooled_dim": pooled_dim})


def build_denoiser(cfg: DictConfig, user_names: list[str] | None = None) -> UserDenoiser:
    denoiser_extra, condition_extra = time_injection(cfg)
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
