"""Sampler config -> scheduler, and the settings a pipeline call takes from it.

`sampler.scheduler` is a `_target_` node (`diffusers.DDIMScheduler.from_config` plus its keyword overrides),
instantiated with `config=` the model's training noise-scheduler config: its betas, timestep count, prediction
type and timestep spacing carry over to whichever sampler is picked (conf/sampler/*.yaml).
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm_users.errors import ConfigError
from ldm_users.inference.fast_sampling import use_fast_sampling


def make_scheduler(sampler_cfg: DictConfig, noise_scheduler_config):
    """The sampler's scheduler over the training noise schedule (`noise_scheduler_config`: a scheduler's config)."""
    node = sampler_cfg.get("scheduler") if sampler_cfg is not None else None
    if not (isinstance(node, DictConfig) and "_target_" in node):
        raise ConfigError(f"sampler.scheduler={node} is not a `_target_` node: pick a sampler with sampler=<name> "
                          f"(conf/sampler/: ddim, ddpm, ...), or give sampler.scheduler._target_="
                          f"diffusers.<Scheduler>.from_config.")
    # Positional: `config` is also the name of instantiate's own first parameter.
    return instantiate(node, dict(noise_scheduler_config), _convert_="all")


def use_sampler(pipe, sampler_cfg: DictConfig, noise_scheduler_config) -> None:
    """Give the pipeline the sampler's scheduler and its denoiser-call mode (sampler.fast)."""
    pipe.scheduler = make_scheduler(sampler_cfg, noise_scheduler_config)
    use_fast_sampling(pipe, sampler_cfg.get("fast", "off"))


def call_kwargs(sampler_cfg: DictConfig) -> dict:
    """The pipeline-call settings of a sampler config (steps, guidance, guidance rescale, eta)."""
    return {"num_inference_steps": int(sampler_cfg.num_inference_steps),
            "guidance_scale": float(sampler_cfg.guidance_scale),
            "guidance_rescale": float(sampler_cfg.get("guidance_rescale", 0.0)),
            "eta": float(sampler_cfg.get("eta", 0.0))}


def adopt_recorded_sampler(cfg: DictConfig, recorded: DictConfig | None, overrides: list[str]) -> bool:
    """cfg.sampler := the sampler the model was trained with, except what the command line sets: `sampler=<name>`
    picks another sampler with its own settings, `sampler.<key>=...` overrides one key of the recorded one.
    Returns whether the recorded sampler was adopted."""
    if recorded is None:
        return False
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    if "sampler" in keys:
        return False
    merged = recorded.copy()
    for key in keys:
        if key.startswith("sampler."):
            OmegaConf.update(merged, key[len("sampler."):], OmegaConf.select(cfg, key), merge=False)
    cfg.sampler = merged
    return True
