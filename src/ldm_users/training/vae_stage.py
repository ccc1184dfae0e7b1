"""Stage 1: train the KL autoencoder, then measure the latent scaling factor and save it with the VAE.

The step is training/steps.VaeTrainStep, the loop (resume, logging, checkpoints, signals) training/loop.py; this
stage adds reconstruction grids and, at the end, the scaling factor and the `save_pretrained` folder `vae/final/`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig
from PIL import Image

from ldm_users import io, layout
from ldm_users.data.folder import PreparedDataset
from ldm_users.evaluation.reconstruction import report_vae_stage
from ldm_users.grid import make_grid, to_uint8
from ldm_users.errors import ConfigError
from ldm_users.inference.loading import load_frozen_vae
from ldm_users.models.build import build_vae
from ldm_users.models.discriminator import NLayerDiscriminator
from ldm_users.training.common import (DataOrder, global_batch, learning_rate, make_lr_scheduler, make_optimizer,
                                       total_steps)
from ldm_users.training.ema import EMASwap, load_ema, make_ema, save_ema
from ldm_users.training.loop import Stage, StageHooks, StageRunner
from ldm_users.training.signals import stop_on_signals
from ldm_users.training.steps import StepSettings, VAEWithLoss, VaeTrainStep
from ldm_users.training.vae_losses import Adversarial, ReconstructionLoss

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
    """The VAE stage's part of the loop: reconstruction grids (of the EMA weights, when kept), the EMA weights in
    checkpoints and the loss terms in the logs."""

    def __init__(self, vae, dataset: PreparedDataset, stage_dir: Path, device, tracker, ema=None):
        self.vae, self.dataset, self.stage_dir, self.device, self.tracker = vae, dataset, stage_dir, device, tracker
        self.ema = ema

    def checkpoint_state(self) -> dict:
        return {"users": self.dataset.users}

    def write_extra(self, folder: Path) -> None:
        save_ema(folder, self.ema, self.vae)

    def resumed(self, folder: Path) -> None:
        load_ema(folder, self.ema, self.vae)

    def sample(self, step: int) -> None:
        with EMASwap(self.ema, self.vae):
            grid = save_recon_grid(self.vae, self.dataset, self.stage_dir / "samples" / f"recon-{step:07d}.png",
                                   self.device)
        self.tracker.log_image("vae/reconstructions", grid, step=step)

    def metrics(self, result) -> dict:
        return result.extras


def check_vae_matches(vae_dir: Path, cfg: DictConfig, key: str = "vae_path") -> None:
    """A saved VAE (`key`=<folder>) must have the latent channels and down blocks of `cfg.vae`, which sizes the
    denoiser's latents."""
    config_file = Path(vae_dir) / "config.json"
    if not config_file.exists():
        raise ConfigError(f"{key}={vae_dir} has no config.json: point it at a VAE saved with save_pretrained "
                          f"(e.g. <run_dir>/vae/final, or Stable Diffusion's vae/ folder with vae=kl_sd).")
    saved = json.loads(config_file.read_text())
    want = cfg.vae.autoencoder
    blocks = len(saved.get("block_out_channels", []))
    if saved.get("latent_channels") != int(want.latent_channels) or blocks != len(want.block_out_channels):
        hint = "vae=kl_sd (Stable Diffusion's layout)" if blocks == 4 else "vae=kl_128 or vae=kl_tiny"
        raise ConfigError(f"{key}={vae_dir} has latent_channels={saved.get('latent_channels')} and {blocks} blocks, "
                          f"but vae={cfg.vae.name} has {want.latent_channels} and {len(want.block_out_channels)}: "
                          f"choose the vae config it was trained with ({hint}, or your own).")


def initial_vae(cfg: DictConfig):
    """The autoencoder to train: vae_train.init_from's pretrained weights (a save_pretrained folder, whole or with
    vae_train.train_decoder_only its decoder fine-tuned, encoder and quant_conv frozen, as Stable Diffusion's
    ft-MSE VAE was made), else `cfg.vae` initialised from `seed`."""
    tcfg = cfg.vae_train
    init_from, decoder_only = tcfg.get("init_from"), bool(tcfg.get("train_decoder_only", False))
    if not init_from:
        if decoder_only:
            raise ConfigError("vae_train.train_decoder_only=true freezes the encoder, so it needs a trained one: "
                              "give vae_train.init_from=/path/to/vae (a save_pretrained folder).")
        set_seed(int(cfg.seed))  # the initial weights are part of what a seed reproduces
        return build_vae(cfg)
    check_vae_matches(Path(init_from), cfg, key="vae_train.init_from")
    vae = load_frozen_vae(init_from, "cpu").requires_grad_(True)
    if decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    return vae


def build_discriminator(cfg: DictConfig, accelerator):
    """The patch discriminator and its Adam (taming's betas 0.5, 0.9), prepared: accelerate's save_state then
    writes both into every checkpoint (model_1.safetensors, optimizer_1.bin) and load_state restores them."""
    dcfg = cfg.vae_train.disc
    torch.manual_seed(int(cfg.seed) + 1)  # its own initialisation, independent of the VAE's
    disc = NLayerDiscriminator(channels=int(dcfg.channels), layers=int(dcfg.layers))
    lr = float(dcfg.lr) if dcfg.get("lr") is not None else learning_rate(cfg.vae_train, cfg, accelerator)
    optimizer = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9))
    return accelerator.prepare(disc, optimizer)


def build_vae_step(cfg: DictConfig, dataset: PreparedDataset, accelerator, num_steps: int) -> VaeTrainStep:
    """The autoencoder with its loss, AdamW and LR schedule (plus the discriminator and its optimizer, and the
    EMA of the VAE's weights, when configured), prepared."""
    tcfg, hw = cfg.vae_train, cfg.hardware
    vae_model = initial_vae(cfg)
    if hw.get("gradient_checkpointing"):
        vae_model.enable_gradient_checkpointing()
    vae = VAEWithLoss(vae_model, ReconstructionLoss(tcfg, accelerator.device), tcfg.kl_weight,
                      decoder_only=bool(tcfg.get("train_decoder_only", False)))
    trainable = [p for p in vae.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, learning_rate(tcfg, cfg, accelerator), float(tcfg.weight_decay),
                               fused=hw.get("fused_adam", False))
    lr_scheduler = make_lr_scheduler(tcfg.lr_scheduler, optimizer, int(tcfg.warmup_steps), num_steps,
                                     accelerator.num_processes)
    vae, optimizer, lr_scheduler = accelerator.prepare(vae, optimizer, lr_scheduler)
    disc_optimizer = None
    if tcfg.get("disc") is not None and float(tcfg.disc.weight) > 0:  # prepared after the VAE: its files are _1
        disc, disc_optimizer = build_discriminator(cfg, accelerator)
        accelerator.unwrap_model(vae).adversarial = Adversarial(tcfg.disc, disc)
    ema_cfg = tcfg.get("ema")
    ema = make_ema(ema_cfg, vae_model, accelerator.device) if ema_cfg is not None else None
    settings = StepSettings(batch=int(hw.batch_size), seed=int(cfg.seed),
                            max_grad_norm=float(tcfg.max_grad_norm) if tcfg.max_grad_norm else float("inf"),
                            random_flip=bool(cfg.data.get("random_flip", False)))
    return VaeTrainStep(accelerator, vae, optimizer, lr_scheduler, DataOrder(len(dataset), int(cfg.seed)), settings,
                        dataset, ema=ema, adversarial=accelerator.unwrap_model(vae).adversarial,
                        disc_optimizer=disc_optimizer)


@stop_on_signals
def train_vae(cfg: DictConfig, run_dir: Path, dataset: PreparedDataset, accelerator, tracker) -> Path:
    """Train (or resume) the VAE; returns the folder of the final `save_pretrained` VAE."""
    tcfg = cfg.vae_train
    stage_dir = layout.stage_dir(run_dir, layout.VAE_STAGE)
    steps = total_steps(tcfg, len(dataset), global_batch(cfg, accelerator))
    step = build_vae_step(cfg, dataset, accelerator, steps)
    vae = accelerator.unwrap_model(step.model).vae
    hooks = VaeHooks(vae, dataset, stage_dir, accelerator.device, tracker, step.ema)
    stage = Stage(name=layout.VAE_STAGE, label="VAE", keys=tcfg, keys_name="vae_train", stage_dir=stage_dir, total_steps=steps,
                  batch=int(cfg.hardware.batch_size), step=step, lr_scheduler=step.lr_scheduler, order=step.order,
                  lr=learning_rate(tcfg, cfg, accelerator), hooks=hooks)
    runner = StageRunner(stage, cfg, dataset.users, accelerator, tracker)
    step.model.train()
    if not runner.run(runner.resume()):
        return None
    vae.eval()
    if step.ema is not None:  # the averaged weights are the ones saved and used
        step.ema.copy_to(vae.parameters())
    final_dir = stage_dir / layout.FINAL
    if accelerator.is_main_process:
        if tcfg.get("train_decoder_only", False):  # the encoder, so the latents and their scale, did not change
            scale = float(vae.config.scaling_factor)
        else:
            scale = latent_scaling_factor(vae, dataset, int(tcfg.scale_samples), max(stage.batch, 16),
                                          accelerator.device, int(cfg.seed))
        vae.register_to_config(scaling_factor=scale)
        # A kill never leaves a torn final/ that still has its config.json.
        with io.atomic_path(final_dir, directory=True) as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
        grid = save_recon_grid(vae, dataset, stage_dir / "samples" / "recon-final.png", accelerator.device)
        tracker.log_image("vae/reconstructions", grid, step=steps)
        tracker.set_summary({"vae/scaling_factor": scale})
        report_vae_stage(cfg, vae, dataset, accelerator.device, tracker)  # PSNR, SSIM, FD of its reconstructions
        log.info("VAE: saved to %s (latent scaling factor %.3g)", final_dir, scale)
    accelerator.wait_for_everyone()
    # Forget this stage's model/optimizer: accelerate would otherwise save them in every LDM checkpoint.
    accelerator.free_memory()
    return final_dir
