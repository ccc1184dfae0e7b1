"""Stage 2: train the user-conditioned denoiser on cached latents of the frozen VAE.

One readable loop (in the spirit of DiT's train.py): sample a micro-batch of cached latent posteriors,
draw z ~ N(mean, std) * scaling_factor, add DDPM noise at random timesteps, replace users by the null
user with probability p_uncond (classifier-free guidance), regress epsilon or v. accelerate handles
mixed precision, gradient accumulation and multi-process; EMA, sample grids, checkpoints and export
happen at their intervals on the main process.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ldm_users.data.folder import PreparedDataset
from ldm_users.grid import user_rows_grid
from ldm_users.inference.export import export_pipeline, make_pipeline
from ldm_users.inference.loading import load_frozen_vae
from ldm_users.inference.samplers import call_kwargs, make_scheduler
from ldm_users.models.build import build_denoiser, count_parameters
from ldm_users.pipeline import UserLDMPipeline
from ldm_users.training import checkpoint as ckpt
from ldm_users.training import latent_cache
from ldm_users.training.common import DataOrder, make_lr_scheduler, make_optimizer, total_steps
from ldm_users.training.nonfinite import BadStepCounter
from ldm_users.training.resume import resolve_resume, write_run_meta
from ldm_users.training.signals import interrupted, stop_on_signals, stop_requested
from ldm_users.training.step import LdmTrainStep

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


class EMASwap:
    """Context for sampling: the model in eval mode (no dropout) holding the EMA weights; afterwards its training
    weights and mode again."""

    def __init__(self, ema: EMAModel | None, module: torch.nn.Module):
        self.ema, self.module = ema, module
        self.params = list(module.parameters())

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)
        self.module.train(self.was_training)


def _save_ema(folder: Path, ema: EMAModel | None, model) -> None:
    if ema is None:
        return
    names = [n for n, _ in model.named_parameters()]
    ckpt.save_tensors(folder / "ema.safetensors", dict(zip(names, ema.shadow_params)))
    (folder / "ema_state.json").write_text(
        json.dumps({"optimization_step": int(ema.optimization_step), "decay": ema.decay}))


def _load_ema(folder: Path, ema: EMAModel | None, model) -> None:
    if ema is None:
        return
    path = folder / "ema.safetensors"
    if not path.exists():
        log.warning("%s has no EMA weights: EMA restarts from the current weights", folder)
        return
    tensors = ckpt.load_tensors(path)
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ckpt.CheckpointError(f"{path} lacks EMA weights for {missing[:3]}: it belongs to another model.")
    for shadow, name in zip(ema.shadow_params, names):
        shadow.data.copy_(tensors[name].to(shadow.device, shadow.dtype))
    state = json.loads((folder / "ema_state.json").read_text())
    ema.optimization_step = state["optimization_step"]


@stop_on_signals
def train_ldm(cfg: DictConfig, run_dir: Path, dataset: PreparedDataset, vae_dir: Path, accelerator, tracker) -> Path:
    """Train (or resume) the denoiser; returns the export folder (None when stopped early on purpose)."""
    tcfg, hw = cfg.train, cfg.hardware
    stage_dir = run_dir / "ldm"
    device = accelerator.device
    batch, accum = int(hw.batch_size), accelerator.gradient_accumulation_steps
    world = accelerator.num_processes
    is_main = accelerator.is_main_process

    vae = load_frozen_vae(vae_dir, device)
    scaling = float(vae.config.scaling_factor)
    cache = latent_cache.load_or_encode(vae, dataset, cfg.paths.cache_dir, device, show_progress=is_main)
    # Latents live on the accelerator when they fit (they are small: 16 KB per 32x32x4 image).
    if device.type == "cuda" and cache.nbytes() < 0.2 * float(hw.memory_gb) * 2**30:
        cache = cache.to(device)

    noise_scheduler = instantiate(cfg.noise_scheduler)
    alphas = noise_scheduler.alphas_cumprod.to(device)
    noise_scheduler.alphas_cumprod = alphas  # add_noise/get_velocity then stay on the device

    set_seed(int(cfg.seed) + 1)  # the initial weights are part of what a seed reproduces
    model = build_denoiser(cfg, dataset.users)
    if hw.get("gradient_checkpointing"):
        model.backbone.enable_gradient_checkpointing()
    channels_last = bool(hw.get("channels_last")) and model.kind == "unet"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = {"denoiser": count_parameters(model.backbone), "user_encoder": count_parameters(model.condition),
              "vae": count_parameters(vae)}
    steps = total_steps(tcfg, len(dataset), batch * accum * world)
    optimizer = make_optimizer(model.parameters(), float(tcfg.lr), float(tcfg.weight_decay),
                               (tcfg.adam_beta1, tcfg.adam_beta2), fused=hw.get("fused_adam", False))
    lr_scheduler = make_lr_scheduler(tcfg.lr_scheduler, optimizer, int(tcfg.warmup_steps), steps, world)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    ema = None
    if tcfg.ema.enabled:
        ema = EMAModel(unwrapped.parameters(), decay=float(tcfg.ema.decay), use_ema_warmup=bool(tcfg.ema.warmup),
                       foreach=True)  # a few fused kernels per step, not two per parameter
        ema.to(device)

    start = 0
    resume_from = resolve_resume(cfg, stage_dir / "checkpoints", dataset.users, stage="ldm")
    if resume_from is not None:
        start = ckpt.load_checkpoint(accelerator, resume_from)["step"]
        _load_ema(resume_from, ema, unwrapped)
        log.info("LDM: resumed from %s at step %d", resume_from, start)

    forward = model
    compile_seconds = None
    if hw.get("compile") and device.type == "cuda":
        forward = torch.compile(model)

    def save(step: int) -> Path:
        def extra(folder: Path) -> None:
            write_run_meta(folder, cfg, dataset.users, stage="ldm")
            _save_ema(folder, ema, unwrapped)
        return ckpt.save_checkpoint(accelerator, stage_dir / "checkpoints", step,
                                    {"stage": "ldm", "epoch": order.epoch_of(step * accum * world * batch)},
                                    write_extra=extra, total_limit=int(tcfg.checkpoints_total_limit))

    def pipeline():
        return make_pipeline(vae, unwrapped, make_scheduler(cfg.sampler, noise_scheduler.config), dataset.users)

    order = DataOrder(len(dataset), int(cfg.seed))
    p_uncond, null_id = float(tcfg.p_uncond), unwrapped.null_id
    prediction_type = str(tcfg.prediction_type)
    log_every = int(tcfg.log_interval)
    max_norm = float(tcfg.max_grad_norm) if tcfg.max_grad_norm else float("inf")
    # The step itself lives in training/step.py so ldm-bench times exactly this code.
    train_step = LdmTrainStep(accelerator=accelerator, model=model, forward=forward, optimizer=optimizer,
                              lr_scheduler=lr_scheduler, noise_scheduler=noise_scheduler, cache=cache, order=order,
                              scaling=scaling, batch=batch, seed=int(cfg.seed), p_uncond=p_uncond, null_id=null_id,
                              prediction_type=prediction_type, channels_last=channels_last, max_norm=max_norm)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    stop_at = int(tcfg.stop_at_step) if tcfg.get("stop_at_step") else None
    progress = tqdm(range(start, steps), initial=start, total=steps, desc="ldm", disable=not is_main)
    running_loss = torch.zeros((), device=device)
    running_norm = torch.zeros((), device=device)
    logged_steps, good_steps, bad_steps = 0, 0, BadStepCounter(tcfg.max_bad_steps, "LDM")
    last_good_checkpoint = resume_from
    t_log, images_since_log = time.perf_counter(), 0
    last_loss, last_rate = float("nan"), float("nan")
    model.train()
    for step in progress:
        t_step = time.perf_counter()
        result = train_step(step)
        loss, grad_norm, skipped = result.last_loss, result.grad_norm, result.skipped
        if skipped:  # not applied to the weights; K in a row stop the run
            bad_steps.bad(step + 1, loss.item(), last_good_checkpoint)
        else:
            bad_steps.good()
            good_steps += 1
            running_loss += result.loss  # skipped steps stay out of the logged means
            running_norm += grad_norm.detach().float()
            if ema is not None:
                ema.step(unwrapped.parameters())
        if compile_seconds is None and hw.get("compile") and device.type == "cuda" and step == start:
            torch.cuda.synchronize()
            compile_seconds = time.perf_counter() - t_step
            log.info("LDM: first (compiling) step took %.1f s", compile_seconds)
        done = step + 1
        logged_steps += 1
        images_since_log += batch * accum * world
        if done % log_every == 0 or done == steps:
            mean_loss = accelerator.reduce(running_loss, "mean").item() / good_steps if good_steps else float("nan")
            mean_norm = running_norm.item() / good_steps if good_steps else float("nan")
            elapsed = time.perf_counter() - t_log
            rate = images_since_log / max(elapsed, 1e-9)
            lr = lr_scheduler.get_last_lr()[0]
            metrics = {"train/loss": mean_loss, "train/lr": lr, "train/grad_norm": mean_norm,
                       "train/images_per_sec": rate, "train/epoch": order.epoch_of(done * accum * world * batch),
                       "train/skipped_steps": bad_steps.total}
            if device.type == "cuda":
                metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            tracker.log(metrics, step=done)
            last_loss, last_rate = mean_loss, rate
            running_loss.zero_()
            running_norm.zero_()
            logged_steps, good_steps, images_since_log, t_log = 0, 0, 0, time.perf_counter()
        if is_main and done % int(tcfg.sample_interval) == 0:
            with EMASwap(ema, unwrapped):
                grid = sample_grid(pipeline(), cfg, dataset.users, stage_dir / "samples" / f"step-{done:07d}.png",
                                   int(cfg.seed))
            tracker.log_image("samples/grid", grid, step=done, caption="one row per user (EMA weights)")
        if done % int(tcfg.save_interval) == 0 and done < steps:
            last_good_checkpoint = save(done)
        if stop_at is not None and done >= stop_at and done < steps:
            # A planned interruption (time-sliced or preemptible jobs): checkpoint, then stop as a kill would.
            if done % int(tcfg.save_interval):
                last_good_checkpoint = save(done)
            log.info("LDM: stopped at step %d as train.stop_at_step asks; rerun the same command to resume.", done)
            return None
        signum = stop_requested(accelerator)  # SIGTERM/SIGINT: checkpoint and stop (every rank at this step)
        if signum and done < steps:
            if done % int(tcfg.save_interval):
                last_good_checkpoint = save(done)
            raise interrupted(signum, f"after LDM step {done} of {steps}; saved {last_good_checkpoint}")

    model.eval()
    if steps > start or ckpt.latest_checkpoint(stage_dir / "checkpoints") is None:
        last_good_checkpoint = save(steps)
    export_dir = run_dir / "export"
    if is_main:
        use_ema = bool(cfg.export.get("use_ema", True)) and ema is not None
        with EMASwap(ema if use_ema else None, unwrapped):
            grid = sample_grid(pipeline(), cfg, dataset.users, stage_dir / "samples" / "final.png", int(cfg.seed))
            if cfg.export.enabled:
                export_pipeline(pipeline(), export_dir, cfg.sampler, noise_scheduler.config, training_config=cfg)
        tracker.log_image("samples/grid", grid, step=steps, caption="final, one row per user (EMA weights)")
        summary = {"final/loss": last_loss, "final/images_per_sec": last_rate, "params/denoiser": params["denoiser"],
                   "params/user_encoder": params["user_encoder"], "params/vae": params["vae"],
                   "train/skipped_steps_total": bad_steps.total, "final/grid": str(grid)}
        if compile_seconds is not None:
            summary["train/compile_seconds"] = compile_seconds
        if device.type == "cuda":
            summary["final/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        tracker.set_summary(summary)
        log.info("LDM: final grid %s; export %s", grid, export_dir if cfg.export.enabled else "(disabled)")
    accelerator.wait_for_everyone()
    return export_dir
