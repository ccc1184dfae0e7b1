"""The one place the LDM trainer is assembled from a config: ldm-train's LDM stage, ldm-bench's "ours" and
ldm-diagnose's memory measurement all build it here, so what is timed and measured is what trains.

From the config: the denoiser (initial weights seeded by `seed`), gradient checkpointing and channels_last
(hardware profile), AdamW and the LR schedule (`train.*`), accelerate's `prepare`, the EMA (`train.ema`), the
noise schedule and training objective, torch.compile (hardware.compile, on any device) and the step itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from omegaconf import DictConfig

from ldm_users.models.build import build_denoiser
from ldm_users.training.common import DataOrder, learning_rate, make_lr_scheduler, make_optimizer
from ldm_users.training.ema import make_ema
from ldm_users.training.latent_cache import LatentCache
from ldm_users.training.objectives import build_objective, make_noise_scheduler
from ldm_users.training.steps import LdmTrainStep, StepSettings


@dataclass
class LdmTrainer:
    model: torch.nn.Module          # as prepared by accelerate (DDP-wrapped with several processes)
    unwrapped: torch.nn.Module      # the UserDenoiser itself (its parameters are the weights)
    optimizer: object
    lr_scheduler: object
    ema: object | None              # diffusers EMAModel, or None with train.ema.enabled=false
    noise_scheduler: object
    step: LdmTrainStep              # step(i) -> StepResult
    compiled: bool                  # the forward runs through torch.compile


def reset_accelerator_state() -> None:
    """Before a new Accelerator with other settings in the same process (ldm-bench runs several variants, the
    memory measurement several profiles): accelerate's state is a process-wide singleton that refuses to change
    its precision otherwise. Never inside a multi-process run."""
    AcceleratorState._reset_state(reset_partial_state=True)


def step_settings(cfg: DictConfig, null_id: int, latent_scale: float, channels_last: bool) -> StepSettings:
    tcfg = cfg.train
    return StepSettings(batch=int(cfg.hardware.batch_size), seed=int(cfg.seed),
                        max_grad_norm=float(tcfg.max_grad_norm) if tcfg.max_grad_norm else float("inf"),
                        latent_scale=latent_scale, p_uncond=float(tcfg.p_uncond), null_id=null_id,
                        channels_last=channels_last)


def build_ldm_trainer(cfg: DictConfig, accelerator, users: list[str], cache: LatentCache, latent_scale: float,
                      num_steps: int, compile_model: bool | None = None) -> LdmTrainer:
    """The denoiser, optimizer, LR schedule, EMA and step for `num_steps` optimizer steps over `cache`.

    compile_model: None follows hardware.compile; ldm-bench passes False to time eager too.
    """
    tcfg, hw = cfg.train, cfg.hardware
    device = accelerator.device
    set_seed(int(cfg.seed) + 1)  # the initial weights are part of what a seed reproduces
    model = build_denoiser(cfg, users)
    if hw.get("gradient_checkpointing"):
        model.backbone.enable_gradient_checkpointing()
    channels_last = bool(hw.get("channels_last")) and model.family.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), learning_rate(tcfg, cfg, accelerator), float(tcfg.weight_decay),
                               (tcfg.adam_beta1, tcfg.adam_beta2), fused=hw.get("fused_adam", False))
    lr_scheduler = make_lr_scheduler(tcfg.lr_scheduler, optimizer, int(tcfg.warmup_steps), num_steps,
                                     accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    ema = make_ema(tcfg.ema, unwrapped, device)
    noise_scheduler = make_noise_scheduler(cfg, device)
    if compile_model is None:
        compile_model = bool(hw.get("compile"))
    forward = torch.compile(model, backend=str(hw.get("compile_backend") or "inductor")) if compile_model else model
    order = DataOrder(cache.num_images, int(cfg.seed), variants=cache.variants)
    settings = step_settings(cfg, unwrapped.null_id, latent_scale, channels_last)
    step = LdmTrainStep(accelerator, model, optimizer, lr_scheduler, order, settings, cache,
                        build_objective(cfg, noise_scheduler), ema=ema, forward=forward)
    return LdmTrainer(model=model, unwrapped=unwrapped, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema,
                      noise_scheduler=noise_scheduler, step=step, compiled=compile_model)
