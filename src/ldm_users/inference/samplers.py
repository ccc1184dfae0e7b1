"""Sampler config -> scheduler, and the settings a pipeline call takes from it.

`sampler.scheduler` is a `_target_` node (`diffusers.DDIMScheduler.from_config` plus its keyword overrides), called
with `config=` the model's training noise-scheduler config: its betas, timestep count, prediction type and timestep
spacing carry over to whichever sampler is picked (conf/sampler/*.yaml). Only diffusers schedulers can be named.
"""

from __future__ import annotations

import re

import diffusers
from diffusers import SchedulerMixin
from omegaconf import DictConfig, OmegaConf

from ldm_users.errors import ConfigError
from ldm_users.inference.fast_sampling import use_fast_sampling
from ldm_users.pipeline.families import is_flow_matching


def scheduler_class(target: str, key: str) -> type:
    """The diffusers scheduler a `_target_` names (`diffusers.X` or `diffusers.X.from_config`), checked by name
    before anything is imported or called. Settings read back from an export or a checkpoint go through here, so
    they can build a diffusers scheduler and nothing else (a Hydra `_target_` could name any callable)."""
    match = re.fullmatch(r"diffusers\.(\w+)(\.from_config)?", target)
    cls = getattr(diffusers, match.group(1), None) if match else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ConfigError(f"{key}={target}: name a diffusers scheduler, e.g. {key}=diffusers.DDIMScheduler.from_config "
                          f"(or pick a sampler with sampler=<name>: conf/sampler/).")
    return cls


def _settings(node: DictConfig) -> dict:
    # Hydra's own keys (_target_, _recursive_, ...) are not scheduler settings.
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}


def noise_scheduler(node: DictConfig):
    """The training noise scheduler a `noise_scheduler` config node describes."""
    return scheduler_class(str(node.get("_target_")), "noise_scheduler._target_")(**_settings(node))


def training_noise_scheduler(cfg: DictConfig):
    """The training noise schedule of a run's `train.objective`: `noise_scheduler` (DDPM) for diffusion; for
    flow_matching a FlowMatchEulerDiscreteScheduler over the same number of timesteps, shifted by
    `train.flow.shift`. Its config is what the sampler is built from and what an export records."""
    if str(OmegaConf.select(cfg, "train.objective", default="diffusion")) == "flow_matching":
        return diffusers.FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=int(cfg.noise_scheduler.num_train_timesteps), shift=float(cfg.train.flow.shift))
    return noise_scheduler(cfg.noise_scheduler)


def make_scheduler(sampler_cfg: DictConfig, noise_scheduler_config):
    """The sampler's scheduler over the training noise schedule (`noise_scheduler_config`: a scheduler's config), as
    `<Scheduler>.from_config(noise_scheduler_config, **sampler.scheduler)`."""
    node = sampler_cfg.get("scheduler") if sampler_cfg is not None else None
    if not (isinstance(node, DictConfig) and "_target_" in node):
        raise ConfigError(f"sampler.scheduler={node} is not a `_target_` node: pick a sampler with sampler=<name> "
                          f"(conf/sampler/: ddim, ddpm, ...), or give sampler.scheduler._target_="
                          f"diffusers.<Scheduler>.from_config.")
    cls = scheduler_class(str(node._target_), "sampler.scheduler._target_")
    scheduler = cls.from_config(dict(noise_scheduler_config), **_settings(node))
    trained_flow = is_flow_matching(noise_scheduler_config)
    if trained_flow != is_flow_matching(scheduler.config):
        raise ConfigError(f"sampler.scheduler={node._target_} cannot sample a model trained with "
                          f"{'flow matching' if trained_flow else 'diffusion'}: use "
                          f"{'sampler=flow_euler' if trained_flow else 'sampler=ddim (or another diffusion sampler)'}.")
    return scheduler


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


# A run's guidance belongs to its model, not to its sampler: how hard the user conditioning is pushed (the few-shot
# presets measured their own, 1.25). Steps, eta and the scheduler are the sampler's.
MODEL_GUIDANCE = ("guidance_scale", "guidance_rescale")


def adopt_recorded_sampler(cfg: DictConfig, recorded: DictConfig | None, overrides: list[str]) -> bool:
    """cfg.sampler := the sampler the model was trained with, except what the command line sets: `sampler=<name>`
    picks another sampler with its own steps and scheduler but keeps the run's guidance, `sampler.<key>=...`
    overrides one key of the recorded one. Returns whether any recorded setting was adopted."""
    if recorded is None:
        return False
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    if "sampler" in keys:
        carried = [k for k in MODEL_GUIDANCE if k in recorded and f"sampler.{k}" not in keys]
        for key in carried:
            OmegaConf.update(cfg, f"sampler.{key}", recorded[key], merge=False)
        return bool(carried)
    merged = recorded.copy()
    for key in keys:
        if key.startswith("sampler."):
            OmegaConf.update(merged, key[len("sampler."):], OmegaConf.select(cfg, key), merge=False)
    cfg.sampler = merged
    return True
