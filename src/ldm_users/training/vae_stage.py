"""Stage 1: train the KL autoencoder, then measure the latent scaling factor and save it with the VAE."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from ldm_users.data.folder import PreparedDataset
from ldm_users.grid import make_grid, to_uint8
from ldm_users.models.build import build_vae
from ldm_users.training import checkpoint as ckpt
from ldm_users.training.common import (DataOrder, make_lr_scheduler, make_optimizer, seed_step, total_steps)
from ldm_users.training.nonfinite import BadStepCounter, step_is_finite
from ldm_users.training.resume import resolve_resume
from ldm_users.training.signals import interrupted, stop_on_signals, stop_requested

log = logging.getLogger(__name__)


class VAEWithLoss(torch.nn.Module):
    """The autoencoder and its training loss behind one forward(), so DDP sees (and syncs) the whole step."""

    def __init__(self, vae, l1_weight: float, l2_weight: float, kl_weight: float):
        super().__init__()
        self.vae = vae
        self.weights = (float(l1_weight), float(l2_weight), float(kl_weight))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        posterior = self.vae.encode(images).latent_dist
        recon = self.vae.decode(posterior.sample()).sample.float()
        images = images.float()
        l1 = F.l1_loss(recon, images)
        l2 = F.mse_loss(recon, images)
        kl = posterior.kl().mean() / images[0].numel()  # per pixel, so kl_weight is comparable across sizes
        w1, w2, wkl = self.weights
        loss = w1 * l1 + w2 * l2 + wkl * kl
        return loss, {"l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach()}


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
    """Real images next to their reconstructions, a row per user."""
    vae.eval()
    rows, labels = [], []
    with torch.no_grad():
        for user in range(min(dataset.num_users, max_users)):
            idx = (dataset.labels == user).nonzero().flatten()[:per_user].numpy()
            images, _ = dataset.batch(idx)
            recon = vae.decode(vae.encode(images.to(device, vae.dtype)).latent_dist.mode()).sample
            real_u8, rec_u8 = to_uint8(images), to_uint8(recon)
            rows.append([Image.fromarray(a) for a in real_u8] + [Image.fromarray(a) for a in rec_u8])
            labels.append(dataset.users[user])
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, labels).save(path)
    vae.train()
    return path


@stop_on_signals
def train_vae(cfg: DictConfig, run_dir: Path, dataset: PreparedDataset, accelerator, tracker) -> Path:
    """Train (or resume) the VAE; returns the folder of the final `save_pretrained` VAE."""
    tcfg = cfg.vae_train
    stage_dir = run_dir / "vae"
    final_dir = stage_dir / "final"
    hw = cfg.hardware
    batch = int(hw.batch_size)
    accum = accelerator.gradient_accumulation_steps
    world, rank = accelerator.num_processes, accelerator.process_index
    steps = total_steps(tcfg, len(dataset), batch * accum * world)

    set_seed(int(cfg.seed))  # the initial weights are part of what a seed reproduces
    vae_model = build_vae(cfg)
    if hw.get("gradient_checkpointing"):
        vae_model.enable_gradient_checkpointing()
    vae = VAEWithLoss(vae_model, tcfg.l1_weight, tcfg.l2_weight, tcfg.kl_weight)
    optimizer = make_optimizer(vae.parameters(), float(tcfg.lr), float(tcfg.weight_decay),
                               fused=hw.get("fused_adam", False))
    lr_scheduler = make_lr_scheduler(tcfg.lr_scheduler, optimizer, int(tcfg.warmup_steps), steps, world)
    vae, optimizer, lr_scheduler = accelerator.prepare(vae, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(vae).vae

    start = 0
    resume_from = resolve_resume(cfg, stage_dir / "checkpoints", dataset.users, stage="vae")
    if resume_from is not None:
        start = ckpt.load_checkpoint(accelerator, resume_from)["step"]
        log.info("VAE: resumed from %s at step %d", resume_from, start)

    def save(step: int) -> Path:
        return ckpt.save_checkpoint(accelerator, stage_dir / "checkpoints", step,
                                    {"stage": "vae", "users": dataset.users},
                                    write_extra=lambda d: _write_meta(d, cfg, dataset),
                                    total_limit=int(cfg.train.checkpoints_total_limit))

    order = DataOrder(len(dataset), int(cfg.seed))
    flip = bool(cfg.data.get("random_flip", False))
    progress = tqdm(range(start, steps), initial=start, total=steps, desc="vae", disable=not accelerator.is_main_process)
    t0, images_done = time.perf_counter(), 0
    running = torch.zeros((), device=accelerator.device)
    good_steps, bad_steps = 0, BadStepCounter(cfg.train.max_bad_steps, "VAE")
    last_good_checkpoint = resume_from
    fp16_scaler = accelerator.scaler is not None
    max_norm = float(tcfg.max_grad_norm) if tcfg.max_grad_norm else float("inf")
    vae.train()
    for step in progress:
        step_loss = torch.zeros((), device=accelerator.device)
        finite = True
        for micro in range(accum):
            seed_step(int(cfg.seed), step, micro, rank)
            position = ((step * accum + micro) * world + rank) * batch
            images, _ = dataset.batch(order.indices(position, batch).numpy())
            images = images.to(accelerator.device)
            if flip:
                mask = torch.rand(images.shape[0], device=images.device) < 0.5
                images = torch.where(mask[:, None, None, None], images.flip(-1), images)
            with accelerator.accumulate(vae), accelerator.autocast():
                loss, parts = vae(images)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(vae.parameters(), max_norm)
                    # A non-finite step is skipped, never applied (the fp16 GradScaler skips by itself).
                    finite = step_is_finite(accelerator, loss, grad_norm)
                    if finite or fp16_scaler:
                        optimizer.step()
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach()
        images_done += batch * accum * world
        done = step + 1
        if not finite or (fp16_scaler and accelerator.optimizer_step_was_skipped):
            bad_steps.bad(done, step_loss.item() / accum, last_good_checkpoint)
        else:
            bad_steps.good()
            running += step_loss
            good_steps += 1
        if done % int(cfg.train.log_interval) == 0 or done == steps:
            mean_loss = (running / (accum * good_steps)).item() if good_steps else float("nan")
            running.zero_()
            good_steps = 0
            rate = images_done / max(time.perf_counter() - t0, 1e-9)
            lr = lr_scheduler.get_last_lr()[0]
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            tracker.log({"vae/loss": mean_loss, "vae/lr": lr, "vae/images_per_sec": rate,
                         "vae/skipped_steps": bad_steps.total,
                         **{f"vae/{k}": v.item() for k, v in parts.items()}}, step=done)
        if accelerator.is_main_process and done % int(tcfg.sample_interval) == 0:
            grid = save_recon_grid(unwrapped, dataset, stage_dir / "samples" / f"recon-{done:07d}.png", accelerator.device)
            tracker.log_image("vae/reconstructions", grid, step=done)
        if done % int(tcfg.save_interval) == 0 and done < steps:
            last_good_checkpoint = save(done)
        signum = stop_requested(accelerator)  # SIGTERM/SIGINT: checkpoint and stop (every rank at this step)
        if signum and done < steps:
            if done % int(tcfg.save_interval):
                last_good_checkpoint = save(done)
            raise interrupted(signum, f"after VAE step {done} of {steps}; saved {last_good_checkpoint}")

    unwrapped.eval()
    if accelerator.is_main_process:
        scale = latent_scaling_factor(unwrapped, dataset, int(tcfg.scale_samples), max(batch, 16),
                                      accelerator.device, int(cfg.seed))
        unwrapped.register_to_config(scaling_factor=scale)
        tmp = stage_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, safe_serialization=True)
        ckpt.replace_dir(tmp, final_dir)  # a kill never leaves a torn final/ that still has its config.json
        grid = save_recon_grid(unwrapped, dataset, stage_dir / "samples" / "recon-final.png", accelerator.device)
        tracker.log_image("vae/reconstructions", grid, step=steps)
        tracker.set_summary({"vae/scaling_factor": scale})
        log.info("VAE: saved to %s (latent scaling factor %.4f)", final_dir, scale)
    accelerator.wait_for_everyone()
    # Forget this stage's model/optimizer: accelerate would otherwise save them in every LDM checkpoint.
    accelerator.free_memory()
    return final_dir


def _write_meta(folder: Path, cfg: DictConfig, dataset: PreparedDataset) -> None:
    from ldm_users.training.resume import write_run_meta

    write_run_meta(folder, cfg, dataset.users, stage="vae")
