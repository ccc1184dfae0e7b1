"""Stage 2: train the user-conditioned denoiser on cached latents of the frozen VAE.

The trainer (model, optimizer, EMA, step) comes from training/trainer.py, the loop (resume, logging,
checkpoints, signals) from training/loop.py; this stage adds the latent cache, the EMA weights in every
checkpoint, sample grids from the EMA weights, snapshots (train.snapshot_at_seconds: an export at a point of the
training clock, in <run>/snapshots/<seconds>s), and at the end the final grid and the diffusers export.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from ldm_users import io, layout
from ldm_users.data.folder import PreparedDataset
from ldm_users.grid import user_rows_grid
from ldm_users.inference.export import export_pipeline, make_pipeline
from ldm_users.inference.loading import load_frozen_vae
from ldm_users.inference.samplers import call_kwargs, make_scheduler
from ldm_users.models.build import build_denoiser, count_parameters, latent_shape
from ldm_users.models.flops import denoiser_train_flops_per_image
from ldm_users.pipeline import UserLDMPipeline
from ldm_users.training import latent_cache
from ldm_users.training.common import global_batch, learning_rate, total_steps
from ldm_users.training.ema import EMASwap, load_ema, save_ema
from ldm_users.training.loop import Stage, StageHooks, StageRunner
from ldm_users.training.signals import stop_on_signals
from ldm_users.training.trainer import LdmTrainer, build_ldm_trainer

log = logging.getLogger(__name__)



def sample_grid(pipe: UserLDMPipeline, cfg: DictConfig, users: list[str], path: Path, seed: int) -> Path:
    """One row per user (the first train.grid_users of them), train.grid_per_user images each."""
    shown = list(range(min(len(users), int(cfg.train.grid_users))))
    per_user = int(cfg.train.grid_per_user)
    generator = torch.Generator(pipe.device).manual_seed(seed)
    images = pipe(users=shown, num_images_per_user=per_user, generator=generator, show_progress=False,
                  **call_kwargs(cfg.sampler)).images
    path.parent.mkdir(parents=True, exist_ok=True)
    user_rows_grid(images, per_user, [users[u] for u in shown]).save(path)
    return path


def load_latents(cfg: DictConfig, vae, dataset: PreparedDataset, accelerator) -> latent_cache.LatentCache:
    """The dataset's latent posteriors (encoded once, cached on disk); on the GPU when they fit (16 KB per
    32x32x4 image: a small share of the memory budget)."""
    is_main = accelerator.is_main_process
    cache = latent_cache.load_or_encode(vae, dataset, cfg.paths.cache_dir, accelerator.device, show_progress=is_main,
                                        augment=latent_cache.Augment.from_cfg(cfg))
    if accelerator.device.type == "cuda" and cache.nbytes() < 0.2 * float(cfg.hardware.memory_gb) * 2**30:
        cache = cache.to(accelerator.device)
    return cache


class LdmHooks(StageHooks):
    """The LDM stage's part of the loop: the EMA weights in every checkpoint, sample grids from the EMA."""

    def __init__(self, cfg: DictConfig, trainer: LdmTrainer, pipeline, users: list[str], stage_dir: Path, tracker):
        self.cfg, self.trainer, self.pipeline, self.users = cfg, trainer, pipeline, users
        self.stage_dir, self.tracker = stage_dir, tracker

    def write_extra(self, folder: Path) -> None:
        save_ema(folder, self.trainer.ema, self.trainer.unwrapped)

    def resumed(self, folder: Path) -> None:
        load_ema(folder, self.trainer.ema, self.trainer.unwrapped)

    def grid(self, name: str, use_ema: bool = True, export_dir: Path | None = None) -> Path:
        with EMASwap(self.trainer.ema if use_ema else None, self.trainer.unwrapped):
            grid = sample_grid(self.pipeline(), self.cfg, self.users, self.stage_dir / layout.SAMPLES / name,
                               int(self.cfg.seed))
            if export_dir is not None:
                export_pipeline(self.pipeline(), export_dir, self.cfg, grid)
        return grid

    def sample(self, step: int) -> None:
        grid = self.grid(f"step-{step:07d}.png")
        self.tracker.log_image("ldm/samples", grid, step=step, caption="one row per user (EMA weights)")

    def snapshot(self, name: str, record: dict) -> None:
        """The export as at the end of training (same weights choice, same writer), plus where the clock was."""
        export_dir = self.stage_dir.parent / layout.SNAPSHOTS / name
        self.grid(f"snapshot-{name}.png", bool(self.cfg.export.get("use_ema", True)), export_dir)
        io.write_json(export_dir / layout.SNAPSHOT_FILE, record)
        log.info("LDM: snapshot %s at step %d (%.1f s of training): %s", name, record["step"],
                 record["train_seconds"], export_dir)


@stop_on_signals
def train_ldm(cfg: DictConfig, run_dir: Path, dataset: PreparedDataset, vae_dir: Path, accelerator,
              tracker) -> Path | None:
    """Train (or resume) the denoiser; returns the export folder (None when stopped early on purpose)."""
    tcfg = cfg.train
    stage_dir = layout.stage_dir(run_dir, layout.LDM_STAGE)
    vae = load_frozen_vae(vae_dir, accelerator.device)
    cache = load_latents(cfg, vae, dataset, accelerator)
    steps = total_steps(tcfg, len(dataset), global_batch(cfg, accelerator))
    trainer = build_ldm_trainer(cfg, accelerator, dataset.users, cache, float(vae.config.scaling_factor), steps)
    scheduler = make_scheduler(cfg.sampler, trainer.noise_scheduler.config)  # grids and export sample with it
    latent_size = latent_shape(cfg)[-1]
    hooks = LdmHooks(cfg, trainer,
                     lambda: make_pipeline(vae, trainer.unwrapped, scheduler, dataset.users, latent_size),
                     dataset.users, stage_dir, tracker)
    stage = Stage(name=layout.LDM_STAGE, label="LDM", keys=tcfg, keys_name="train", stage_dir=stage_dir, total_steps=steps,
                  batch=int(cfg.hardware.batch_size), step=trainer.step, lr_scheduler=trainer.lr_scheduler,
                  order=trainer.step.order, lr=learning_rate(tcfg, cfg, accelerator), hooks=hooks, time_first_step=trainer.compiled)
    runner = StageRunner(stage, cfg, dataset.users, accelerator, tracker)
    trainer.model.train()
    if not runner.run(runner.resume()):
        return None
    trainer.model.eval()
    runner.save_final()
    export_dir = layout.export_dir(run_dir)
    if accelerator.is_main_process:
        use_ema = bool(cfg.export.get("use_ema", True))
        grid = hooks.grid("final.png", use_ema, export_dir if cfg.export.enabled else None)
        tracker.log_image("ldm/samples", grid, step=runner.end_step, caption="final, one row per user (EMA weights)")
        tracker.set_summary(final_summary(cfg, runner, trainer, vae, dataset.users))
        log.info("LDM: final grid %s; export %s", grid, export_dir if cfg.export.enabled else "(disabled)")
    accelerator.wait_for_everyone()
    return export_dir


def final_summary(cfg: DictConfig, runner: StageRunner, trainer: LdmTrainer, vae, users: list[str]) -> dict:
    """What runs are compared by that only this stage knows: exact sizes, training FLOPs per image, skipped steps.
    The smoothed loss, median images/s, peak memory and wall-clock come from the whole logged history
    (tracking/summary.py), so a resumed or eval-only rerun reports them too."""
    model = trainer.unwrapped
    summary = {"params/denoiser": count_parameters(model.backbone),
               "params/user_encoder": count_parameters(model.condition), "params/vae": count_parameters(vae),
               "ldm/skipped_steps_total": runner.bad.total, "ldm/train_seconds": runner.clock.elapsed}
    try:  # on fake tensors: seconds even for the largest model, and no memory
        summary["ldm/train_flops_per_image"] = denoiser_train_flops_per_image(
            lambda: build_denoiser(cfg, users), latent_shape(cfg), len(users))
    except Exception as err:  # a backbone the flop counter cannot trace: the figure is missing, training is not
        log.warning("LDM: training FLOPs per image not counted (%s)", err)
    if runner.first_step_seconds is not None:
        summary["ldm/compile_seconds"] = runner.first_step_seconds
    return summary
