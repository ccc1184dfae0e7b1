"""VAE / denoiser / user-encoder / dataset compatibility check (the notes' check_vae_ldm_compatibility.py).

Runs at the start of every entry point, before anything heavy is built, and on demand in `ldm-diagnose`.
Each problem is one line naming the keys, their values and the override that fixes it.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ldm_users.errors import ConfigError
from ldm_users.models.build import model_kind


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None)


def _unet_problems(den: DictConfig, cond: DictConfig) -> list[str]:
    problems = []
    channels = [int(c) for c in den.block_out_channels]
    if len(den.down_block_types) != len(channels) or len(den.up_block_types) != len(channels):
        problems.append(f"model.denoiser has {len(channels)} block_out_channels but {len(den.down_block_types)} "
                        f"down and {len(den.up_block_types)} up block types: give them the same length.")
    if int(den.cross_attention_dim) != int(cond.embed_dim):
        problems.append(f"model.denoiser.cross_attention_dim={den.cross_attention_dim} but "
                        f"model.condition.embed_dim={cond.embed_dim}: set both from model.embed_dim "
                        f"(e.g. model.embed_dim={den.cross_attention_dim}).")
    heads = den.get("attention_head_dim", 8)  # diffusers' UNet uses this value as the number of heads
    head_list = list(heads) if not isinstance(heads, int) else [heads] * len(channels)
    for ch, h, block in zip(channels, head_list, den.down_block_types):
        if "CrossAttn" in block and int(ch) % int(h):
            problems.append(f"model.denoiser.attention_head_dim={h} (attention heads) does not divide the "
                            f"{ch} channels of a {block}: use a divisor of {ch}, e.g. model.denoiser."
                            f"attention_head_dim=8.")
    groups = int(den.get("norm_num_groups", 32))
    for ch in channels:
        if ch % groups:
            problems.append(f"model.denoiser.block_out_channels has {ch}, not divisible by "
                            f"model.denoiser.norm_num_groups={groups}.")
    return problems


def _flux_problems(den: DictConfig, cond: DictConfig) -> list[str]:
    problems = []
    rope = [int(d) for d in den.axes_dims_rope]
    if sum(rope) != int(den.attention_head_dim):
        problems.append(f"model.denoiser.axes_dims_rope={rope} sums to {sum(rope)} but attention_head_dim="
                        f"{den.attention_head_dim}: the rotary axes must split the head exactly "
                        f"(e.g. [{int(den.attention_head_dim) // 8}, {3 * int(den.attention_head_dim) // 8}, "
                        f"{3 * int(den.attention_head_dim) // 8}]).")
    if int(den.joint_attention_dim) != int(cond.embed_dim):
        problems.append(f"model.denoiser.joint_attention_dim={den.joint_attention_dim} but model.condition.embed_dim="
                        f"{cond.embed_dim}: set both from model.embed_dim.")
    if int(den.pooled_projection_dim) != int(cond.get("pooled_dim") or 0):
        problems.append(f"model.denoiser.pooled_projection_dim={den.pooled_projection_dim} but model.condition."
                        f"pooled_dim={cond.get('pooled_dim')}: set both from model.embed_dim.")
    return problems


def _objective_problems(cfg: DictConfig) -> list[str]:
    """A flow-matching model needs a flow-matching sampler and the other way round."""
    objective = str(_get(cfg, "train.objective") or "diffusion")
    sampler = cfg.sampler.scheduler
    target = str(sampler.get("_target_", "")) if isinstance(sampler, DictConfig) else str(sampler)
    flow_sampler = "flow" in target.lower()
    if (objective == "flow_matching") != flow_sampler:
        fix = "sampler=flow_euler" if objective == "flow_matching" else "sampler=ddim"
        return [f"train.objective={objective} but the sampler ({target}) is for "
                f"{'flow matching' if flow_sampler else 'diffusion'}: use {fix}."]
    return []


def check_compatibility(cfg: DictConfig, dataset_num_users: int | None = None) -> list[str]:
    problems: list[str] = []
    vae = cfg.vae.autoencoder
    den = cfg.model.denoiser
    try:
        kind = model_kind(cfg)
    except ConfigError as err:  # an unknown backbone is one problem among the others
        problems.append(str(err))
        kind = None
    resolution = int(cfg.data.resolution)

    latent_channels = int(vae.latent_channels)
    # Flux takes 2x2 patches of latents as tokens: 4x the channels (derived in conf/model/flux*.yaml).
    channels = latent_channels * 4 if kind == "flux" else latent_channels
    for key in ("in_channels", "out_channels"):
        value = den.get(key)
        if value is not None and int(value) != channels:
            packed = " x 4 (Flux's 2x2 patches)" if kind == "flux" else ""
            problems.append(f"model.denoiser.{key}={value} but vae.autoencoder.latent_channels={latent_channels}"
                            f"{packed}: set model.denoiser.{key}={channels} (or remove the override: it is derived).")

    n_down = len(vae.down_block_types)
    factor = 2 ** (n_down - 1)
    if resolution % factor:
        problems.append(f"data.resolution={resolution} is not divisible by the VAE's downsampling factor {factor} "
                        f"({n_down} down blocks): use data.resolution={max(factor, resolution // factor * factor)}.")
    latent_size = resolution // factor
    if kind == "flux" and latent_size % 2:
        even = 2 * factor * max(1, latent_size // 2)
        problems.append(f"the latents are {latent_size}x{latent_size} (data.resolution={resolution}) but Flux packs "
                        f"2x2 patches: use a data.resolution giving even latents, e.g. data.resolution={even}.")
    if kind != "flux" and int(den.sample_size) != latent_size:
        problems.append(f"model.denoiser.sample_size={den.sample_size} but the latents are {latent_size}x{latent_size} "
                        f"(data.resolution={resolution} / 2^({n_down}-1)): set model.denoiser.sample_size={latent_size}.")
    if len(vae.up_block_types) != n_down or len(vae.block_out_channels) != n_down:
        problems.append(f"vae.autoencoder has {n_down} down blocks, {len(vae.up_block_types)} up blocks and "
                        f"{len(vae.block_out_channels)} block_out_channels: give all three the same length.")
    vae_groups = int(vae.get("norm_num_groups", 32))
    for ch in vae.block_out_channels:
        if int(ch) % vae_groups:
            problems.append(f"vae.autoencoder.block_out_channels has {ch}, not divisible by "
                            f"vae.autoencoder.norm_num_groups={vae_groups}: pick channels that are multiples of it.")

    if kind == "unet":
        problems.extend(_unet_problems(den, cfg.model.condition))
        model_users, users_key = cfg.model.condition.num_users, "model.condition.num_users"
    elif kind == "dit":
        patch = int(den.patch_size)
        if int(den.sample_size) % patch:
            problems.append(f"model.denoiser.patch_size={patch} does not divide the latent size {den.sample_size}: "
                            f"use a divisor, e.g. model.denoiser.patch_size=2.")
        model_users, users_key = den.num_embeds_ada_norm, "model.denoiser.num_embeds_ada_norm"
    elif kind == "flux":
        problems.extend(_flux_problems(den, cfg.model.condition))
        model_users, users_key = cfg.model.condition.num_users, "model.condition.num_users"
    else:  # unknown: reported above
        model_users, users_key = None, ""
    problems.extend(_objective_problems(cfg))

    if dataset_num_users is not None and model_users is not None and int(model_users) != dataset_num_users:
        problems.append(f"{users_key}={model_users} (data.num_users) but the dataset at {cfg.data.root} has "
                        f"{dataset_num_users} users: set data.num_users={dataset_num_users} or leave it null.")
    if model_users is None and kind is not None and dataset_num_users is None:
        problems.append(f"{users_key} is not set and there is no dataset to count users from: set data.num_users.")
    return problems


def assert_compatible(cfg: DictConfig, dataset_num_users: int | None = None) -> None:
    problems = check_compatibility(cfg, dataset_num_users)
    if problems:
        raise ConfigError("the configuration is not consistent:\n  - " + "\n  - ".join(problems))
