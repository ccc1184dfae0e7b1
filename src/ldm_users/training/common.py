"""What both training stages share: the accelerator from the hardware profile, step counts, data order,
per-step seeding (which makes resume bit-exact), optimizer and LR schedule."""

from __future__ import annotations

import logging
import math
import os

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from omegaconf import DictConfig

from ldm_users.errors import ConfigError

log = logging.getLogger(__name__)


# What a profile may ask for that a CPU cannot do at all. Everything else (bf16 and fp16 autocast, the fp16 loss
# scaler, torch.compile, fused AdamW, channels_last, gradient checkpointing) runs on the CPU as on a GPU, so the
# tests exercise each path before a GPU user meets it.
GPU_ONLY = {"allow_tf32": "TF32 matmuls"}


def mixed_precision(hw: DictConfig) -> str | None:
    """hardware.mixed_precision, or None to leave it to accelerate (`accelerate launch --mixed_precision`,
    `accelerate config`: both reach the process as ACCELERATE_MIXED_PRECISION). A profile that sets a precision
    accelerate's environment contradicts is an error: one of them would be silently ignored."""
    wanted = hw.get("mixed_precision")
    env = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if wanted is None:
        return None
    wanted = str(wanted).lower()
    if env is not None and env.lower() != wanted:
        raise ConfigError(f"hardware.mixed_precision={wanted} (hardware={hw.name}) but accelerate is set to {env} "
                          "(ACCELERATE_MIXED_PRECISION, from `accelerate launch --mixed_precision` or `accelerate "
                          f"config`): set hardware.mixed_precision=null to let accelerate decide, or launch with "
                          f"--mixed_precision {wanted}.")
    return wanted


def effective_precision(hw: DictConfig) -> str:
    """The precision a run with this profile trains in: the profile's, else accelerate's (fp32 without either)."""
    return mixed_precision(hw) or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def make_accelerator(cfg: DictConfig) -> Accelerator:
    hw = cfg.hardware
    gpu = torch.cuda.is_available()
    off = [f"{key} ({what})" for key, what in GPU_ONLY.items() if hw.get(key)] if not gpu else []
    if off:
        log.info("hardware=%s on the CPU: %s need a GPU and are off; everything else in the profile runs.",
                 hw.name, ", ".join(off))
    if gpu and hw.get("allow_tf32"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if hw.get("num_threads"):
        torch.set_num_threads(int(hw.num_threads))
    # Under torchrun without a GPU, accelerate only goes multi-process (gloo) when told it is on the CPU; otherwise
    # every process would train alone and all of them would write the same run dir.
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(mixed_precision=mixed_precision(hw), cpu=launched > 1 and not gpu,
                              gradient_accumulation_steps=int(hw.gradient_accumulation_steps))
    if launched > 1 and accelerator.num_processes != launched:
        raise ConfigError(f"launched as {launched} processes (WORLD_SIZE) but accelerate sees "
                          f"{accelerator.num_processes}: they would overwrite each other's checkpoints. Launch with "
                          "`accelerate launch` or `torchrun` and check `accelerate env`.")
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu" and accelerator.scaler is None:
        # accelerate autocasts to fp16 and scales the loss only on accelerators; on the CPU "fp16" would silently
        # train in fp32. torch has both for the CPU, so the fp16 path (autocast + GradScaler: an overflow skips the
        # step and backs off the scale; the scale is saved in checkpoints) runs here as on a P100. Set before
        # `prepare`, which wraps the model's forward and the optimizer with them.
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator


def global_batch(cfg: DictConfig, accelerator) -> int:
    """Images per optimizer step over all processes: per-device batch x accumulation x world size."""
    return int(cfg.hardware.batch_size) * accelerator.gradient_accumulation_steps * accelerator.num_processes


def learning_rate(stage_cfg: DictConfig, cfg: DictConfig, accelerator) -> float:
    """The stage's peak learning rate: `lr`, or with `scale_lr=true` lr x global batch, as diffusers' training
    examples do (`--scale_lr`), so a run moved to more GPUs or a bigger batch keeps its per-image step size."""
    lr = float(stage_cfg.lr)
    return lr * global_batch(cfg, accelerator) if stage_cfg.get("scale_lr", False) else lr


def total_steps(train_cfg: DictConfig, num_samples: int, samples_per_step: int) -> int:
    """Optimizer steps from max_steps, or from num_epochs when that is set (the notes train by epochs)."""
    if train_cfg.get("num_epochs"):
        return max(1, math.ceil(float(train_cfg.num_epochs) * num_samples / samples_per_step))
    return int(train_cfg.max_steps)


class DataOrder:
    """Which rows of the data each micro-batch takes, as a pure function of the step.

    Each epoch is a permutation of the n images seeded by (seed, epoch); the sample stream is the concatenation
    of epochs. Because position = f(step), resuming at a step continues the exact same stream. With variants > 1
    (an augmented latent cache: row v * n + i is variant v of image i), every epoch also draws one variant per
    image, from its own generator seeded by (seed, epoch) too.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, variants: int = 1):
        self.n, self.seed, self.shuffle, self.variants = num_samples, seed, shuffle, variants
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
            if self.variants > 1:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 7_919 + 1)
                perm = torch.randint(0, self.variants, (self.n,), generator=g) * self.n + perm
            self._perms[epoch] = perm
        return self._perms[epoch]

    def indices(self, position: int, count: int) -> torch.Tensor:
        out = []
        while count > 0:
            epoch, offset = divmod(position, self.n)
            take = min(count, self.n - offset)
            out.append(self._perm(epoch)[offset:offset + take])
            position, count = position + take, count - take
        return torch.cat(out)

    def epoch_of(self, position: int) -> int:
        return position // self.n


def seed_step(seed: int, step: int, micro: int, rank: int) -> None:
    """Seed every RNG (noise, timesteps, dropout) from (seed, step, micro-batch, rank): exact resume."""
    torch.manual_seed(((seed * 1_000_003 + step) * 131 + micro) * 8191 + rank)


def make_optimizer(params, lr: float, weight_decay: float, betas=(0.9, 0.999), fused: bool = False):
    # Fused AdamW (one kernel for all parameters) exists for CUDA and, since torch 2.4, CPU tensors.
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                             **({"fused": True} if fused else {}))


def make_lr_scheduler(name: str, optimizer, warmup_steps: int, num_steps: int, num_processes: int):
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps * num_processes,
                         num_training_steps=num_steps * num_processes)
