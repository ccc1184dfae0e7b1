"""Stage 1: train the KL autoencoder, then measure the latent scaling factor and save it with the VAE.

The step is training/steps.VaeTrainStep, the loop (resume, logging, checkpoints, signals) training/loop.py; this
stage adds reconstruction grids and, at the end, the scaling factor and the `save_pretrained` folder `vae/final/`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig
from PIL import Image

from ldm_users import io
from ldm_users.data.folder import PreparedDataset
from ldm_users.grid import make_grid, to_uint8
from ldm_users.models.build import build_vae
from ldm_users.training.common import (DataOrder, global_batch, learning_rate, make_lr_scheduler, make_optimizer,
                                       total_steps)
from ldm_users.training.loop import Stage, StageHooks, StageRunner
from ldm_users.training.signals import stop_on_signals
from ldm_users.training.steps import StepSettings, VAEWithLoss, VaeTrainStep

log = logging.getLogger(__name__)


@torch.no_grad()
def latent_scaling_factor(vae, dataset: PreparedDataset, num_samples: int, batch_size: int, device,
                          seed: int = 0) -> float:
    """1 / std of posterior samples over a random sample of the dataset (not just one batch)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:num_samples]
    torch.manual_seed(seed)  # posterior samples below
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(idx), batch_size):
        images, _ = dataset.batch(idx[start:start + batch_size].numpy())
        z = vae.encode(images.to(device, vae.dtype)).latent_dist.sample(generator=None).double()
        total += z.sum().item()
        total_sq += (z * z).sum().item()
        count += z.numel()
    mean = total / count
    std = max((total_sq / count - mean * mean) ** 0.5, 1e-8)
    return 1.0 / std


def save_recon_grid(vae, dataset: PreparedDataset, path: Path, device, per_user: int = 4, max_users: int = 8):
    """Real images next to their reconstructions, a row per user, under "real | reconstruction" headers."""
    vae.eval()
    rows, labels = [], []
    users = range(min(dataset.num_users, max_users))
    per_user = min(per_user, *(int((dataset.labels == u).sum()) for u in users))  # columns line up under headers
    with torch.no_grad():
        for user in users:
            idx = (dataset.labels == user).nonzero().flatten()[:per_user].numpy()
            images, _ = dataset.batch(idx)
            recon = vae.decode(vae.encode(images.to(device, vae.dtype)).latent_dist.mode()).sample
            real_u8, rec_u8 = to_uint8(images), to_uint8(recon)
            rows.append([Image.fromarray(a) for a in real_u8] + [Image.fromarray(a) for a in rec_u8])
            labels.append(dataset.users[user])
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, labels, columns=[("real", per_user), ("reconstruction", per_user)]).save(path)
    vae.train()
    return path


class VaeHooks(StageHooks):
    """The VAE stage's part of the loop: reconstruction grids and the loss terms in the logs."""

    def __init__(self, vae, dataset: PreparedDataset, stage_dir: Path, device, tracker):
        self.vae, self.dataset, self.stage_dir, self.device, self.tracker = vae, dataset, stage_dir, device, tracker

    def checkpoint_state(self) -> dict:
        return {"users": self.dataset.users}

    def sample(self, step: int) -> None:
        grid = save_recon_grid(self.vae, self.dataset, self.stage_dir / "samples" / f"recon-{step:07d}.png",
                               self.device)
        self.tracker.log_image("vae/reconstructions", grid, step=step)

    def metrics(self, result) -> dict:
        return result.extras


def build_vae_step(cfg: DictConfig, dataset: PreparedDataset, accelerator, num_steps: int) -> VaeTrainStep:
    """The autoencoder (initial weights seeded by `seed`) with its loss, AdamW and LR schedule, prepared."""
    tcfg, hw = cfg.vae_train, cfg.hardware
    set_seed(int(cfg.seed))  # the initial weights are part of what a seed reproduces
    vae_model = build_vae(cfg)
    if hw.get("gradient_checkpointing"):
        vae_model.enable_gradient_checkpointing()
    vae = VAEWithLoss(vae_model, tcfg.l1_weight, tcfg.l2_weight, tcfg.kl_weight)
    optimizer = make_optimizer(vae.parameters(), learning_rate(tcfg, cfg, accelerator), float(tcfg.weight_decay),
                               fused=hw.get("fused_adam", False))
    lr_scheduler = make_lr_scheduler(tcfg.lr_scheduler, optimizer, int(tcfg.warmup_steps), num_steps,
                                     accelerator.num_processes)
    vae, optimizer, lr_scheduler = accelerator.prepare(vae, optimizer, lr_scheduler)
    settings = StepSettings(batch=int(hw.batch_size), seed=int(cfg.seed),
                            max_grad_norm=float(tcfg.max_grad_norm) if tcfg.max_grad_norm else float("inf"),
                            random_flip=bool(cfg.data.get("random_flip", False)))
    return VaeTrainStep(accelerator, vae, optimizer, lr_scheduler, DataOrder(len(dataset), int(cfg.seed)), settings,
                        dataset)


@stop_on_signals
def train_vae(cfg: DictConfig, run_dir: Path, dataset: PreparedDataset, accelerator, tracker) -> Path:
    """Train (or resume) the VAE; returns the folder of the final `save_pretrained` VAE."""
    tcfg = cfg.vae_train
    stage_dir = run_dir / "vae"
    steps = total_steps(tcfg, len(dataset), global_batch(cfg, accelerator))
    step = build_vae_step(cfg, dataset, accelerator, steps)
    vae = accelerator.unwrap_model(step.model).vae
    hooks = VaeHooks(vae, dataset, stage_dir, accelerator.device, tracker)
    stage = Stage(name="vae", label="VAE", keys=tcfg, keys_name="vae_train", stage_dir=stage_dir, total_steps=steps,
                  batch=int(cfg.hardware.batch_size), step=step, lr_scheduler=step.lr_scheduler, order=step.order,
                  lr=learning_rate(tcfg, cfg, accelerator), hooks=hooks)
    runner = StageRunner(stage, cfg, dataset.users, accelerator, tracker)
    step.model.train()
    if not runner.run(runner.resume()):
        return None
    vae.eval()
    final_dir = stage_dir / "final"
    if accelerator.is_main_process:
        scale = latent_scaling_factor(vae, dataset, int(tcfg.scale_samples), max(stage.batch, 16),
                                      accelerator.device, int(cfg.seed))
        vae.register_to_config(scaling_factor=scale)
        # A kill never leaves a torn final/ that still has its config.json.
        with io.atomic_path(final_dir, directory=True) as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
        grid = save_recon_grid(vae, dataset, stage_dir / "samples" / "recon-final.png", accelerator.device)
        tracker.log_image("vae/reconstructions", grid, step=steps)
        tracker.set_summary({"vae/scaling_factor": scale})
        log.info("VAE: saved to %s (latent scaling factor %.4f)", final_dir, scale)
    accelerator.wait_for_everyone()
    # Forget this stage's model/optimizer: accelerate would otherwise save them in every LDM checkpoint.
    accelerator.free_memory()
    return final_dir
