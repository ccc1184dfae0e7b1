"""VAE / denoiser / user-encoder / dataset compatibility check: the VAE and objective checks here, the backbone's
from its family (pipeline/families.py).

Runs at the start of every entry point, before anything heavy is built, and on demand in `ldm-diagnose`.
Each problem is one line naming the keys, their values and the override that fixes it.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ldm_users.errors import ConfigError
from ldm_users.models.build import model_family
from ldm_users.pipeline.families import downsampling_factor, is_flow_matching, latent_size


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None)


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _vae_problems(vae: DictConfig, resolution: int) -> list[str]:
    problems = []
    n_down = len(vae.down_block_types)
    factor = downsampling_factor(n_down)
    if resolution % factor:
        problems.append(f"data.resolution={resolution} is not divisible by the VAE's downsampling factor {factor} "
                        f"({n_down} down blocks): use data.resolution={max(factor, resolution // factor * factor)}.")
    if len(vae.up_block_types) != n_down or len(vae.block_out_channels) != n_down:
        problems.append(f"vae.autoencoder has {n_down} down blocks, {len(vae.up_block_types)} up blocks and "
                        f"{len(vae.block_out_channels)} block_out_channels: give all three the same length.")
    vae_groups = int(vae.get("norm_num_groups", 32))
    for ch in vae.block_out_channels:
        if int(ch) % vae_groups:
            problems.append(f"vae.autoencoder.block_out_channels has {ch}, not divisible by "
                            f"vae.autoencoder.norm_num_groups={vae_groups}: pick channels that are multiples of it.")
    return problems


def _objective_problems(cfg: DictConfig) -> list[str]:
    """A flow-matching model needs a flow-matching sampler and the other way round."""
    objective = str(_get(cfg, "train.objective") or "diffusion")
    sampler = cfg.sampler.scheduler
    target = str(sampler.get("_target_", "")) if isinstance(sampler, DictConfig) else str(sampler)
    flow_sampler = is_flow_matching(target)
    if (objective == "flow_matching") != flow_sampler:
        fix = "sampler=flow_euler" if objective == "flow_matching" else "sampler=ddim"
        return [f"train.objective={objective} but the sampler ({target}) is for "
                f"{'flow matching' if flow_sampler else 'diffusion'}: use {fix}."]
    return []


def check_compatibility(cfg: DictConfig, dataset_num_users: int | None = None) -> list[str]:
    problems: list[str] = []
    vae = cfg.vae.autoencoder
    resolution = int(cfg.data.resolution)
    problems.extend(_vae_problems(vae, resolution))
    try:
        family = model_family(cfg)
    except ConfigError as err:  # an unknown backbone is one problem among the others
        problems.append(str(err))
        family = None
    if family is not None:
        den, cond = _plain(cfg.model.denoiser), _plain(cfg.model.get("condition"))
        problems.extend(family.problems(den, cond or None, int(vae.latent_channels),
                                        latent_size(resolution, vae.down_block_types),
                                        downsampling_factor(vae.down_block_types)))
    problems.extend(_objective_problems(cfg))
    if family is None:
        return problems

    model_users, users_key = family.model_users(den, cond or None), family.users_key
    if dataset_num_users is not None and model_users is not None and int(model_users) != dataset_num_users:
        problems.append(f"{users_key}={model_users} (data.num_users) but the dataset at {cfg.data.root} has "
                        f"{dataset_num_users} users: set data.num_users={dataset_num_users} or leave it null.")
    if model_users is None and dataset_num_users is None:
        problems.append(f"{users_key} is not set and there is no dataset to count users from: set data.num_users.")
    return problems


def assert_compatible(cfg: DictConfig, dataset_num_users: int | None = None) -> None:
    problems = check_compatibility(cfg, dataset_num_users)
    if problems:
        raise ConfigError("the configuration is not consistent:\n  - " + "\n  - ".join(problems))
