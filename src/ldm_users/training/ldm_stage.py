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
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDIMScheduler
from diffusers.training_utils import EMAModel
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from ldm_users.data.folder import PreparedDataset
from ldm_users.errors import LdmUsersError
from ldm_users.grid import make_grid
from ldm_users.models.build import build_denoiser, count_parameters
from ldm_users.pipeline import UserLDMPipeline
from ldm_users.training import checkpoint as ckpt
from ldm_users.training import latent_cache
from ldm_users.training.common import DataOrder, make_lr_scheduler, make_optimizer, seed_step, total_steps
from ldm_users.training.resume import resolve_resume, write_run_meta

log = logging.getLogger(__name__)


class NonFiniteLossError(LdmUsersError):
    pass


def diffusion_target(scheduler, latents, noise, timesteps, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"train.prediction_type={prediction_type}: use epsilon or v_prediction")


def make_pipeline(vae, denoiser, noise_scheduler, users: list[str]) -> UserLDMPipeline:
    """A pipeline over in-memory components (training-time grids and the final export share it)."""
    backbone = denoiser.backbone
    scheduler = DDIMScheduler.from_config(noise_scheduler.config)
    if denoiser.is_dit:
        return UserLDMPipeline(vae=vae, scheduler=scheduler, transformer=backbone, user_names=users)
    return UserLDMPipeline(vae=vae, scheduler=scheduler, unet=backbone, user_encoder=denoiser.condition,
                           user_names=users)


def sample_grid(pipe: UserLDMPipeline, cfg: DictConfig, users: list[str], path: Path, seed: int) -> Path:
    """One row per user (the first train.grid_users of them), train.grid_per_user images each."""
    shown = list(range(min(len(users), int(cfg.train.grid_users))))
    per_user = int(cfg.train.grid_per_user)
    generator = torch.Generator(pipe.device).manual_seed(seed)
    images = pipe(users=shown, num_images_per_user=per_user, num_inference_steps=int(cfg.sampler.num_inference_steps),
                  guidance_scale=float(cfg.sampler.guidance_scale), generator=generator, show_progress=False).images
    rows = [images[i * per_user:(i + 1) * per_user] for i in range(len(shown))]
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, [users[u] for u in shown]).save(path)
    return path


def export_pipeline(pipe: UserLDMPipeline, out_dir: Path) -> Path:
    """diffusers layout (vae/, unet/ or transformer/, user_encoder/, scheduler/, model_index.json), atomically."""
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "users.json").write_text(json.dumps({"users": pipe.user_names}, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


class EMASwap:
    """Context: the model holds the EMA weights inside, its training weights again after."""

    def __init__(self, ema: EMAModel | None, params):
        self.ema, self.params = ema, list(params)

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)


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


def load_frozen_vae(vae_dir, device, dtype=torch.float32) -> AutoencoderKL:
    vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def train_ldm(cfg: DictConfig, run_dir: Path, dataset: PreparedDataset, vae_dir: Path, accelerator, tracker) -> Path:
    """Train (or resume) the denoiser; returns the export folder (None when stopped early on purpose)."""
    tcfg, hw = cfg.train, cfg.hardware
    stage_dir = run_dir / "ldm"
    device = accelerator.device
    batch, accum = int(hw.batch_size), accelerator.gradient_accumulation_steps
    world, rank = accelerator.num_processes, accelerator.process_index
    is_main = accelerator.is_main_process

    vae = load_frozen_vae(vae_dir, device)
    scaling = float(vae.config.scaling_factor)
    cache = latent_cache.load_or_encode(vae, dataset, cfg.paths.cache_dir, device, show_progress=is_main,
                                        is_main_process=is_main, wait=accelerator.wait_for_everyone)
    # Latents live on the accelerator when they fit (they are small: 16 KB per 32x32x4 image).
    if device.type == "cuda" and cache.nbytes() < 0.2 * float(hw.memory_gb) * 2**30:
        cache = cache.to(device)

    noise_scheduler = instantiate(cfg.noise_scheduler)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    alphas = noise_scheduler.alphas_cumprod.to(device)
    noise_scheduler.alphas_cumprod = alphas  # add_noise/get_velocity then stay on the device

    set_seed(int(cfg.seed) + 1)  # the initial weights are part of what a seed reproduces
    model = build_denoiser(cfg, dataset.users)
    if hw.get("gradient_checkpointing"):
        model.backbone.enable_gradient_checkpointing()
    channels_last = bool(hw.get("channels_last")) and not model.is_dit
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
        ema = EMAModel(unwrapped.parameters(), decay=float(tcfg.ema.decay), use_ema_warmup=bool(tcfg.ema.warmup))
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
        return make_pipeline(vae, unwrapped, noise_scheduler, dataset.users)

    order = DataOrder(len(dataset), int(cfg.seed))
    p_uncond, null_id = float(tcfg.p_uncond), unwrapped.null_id
    prediction_type = str(tcfg.prediction_type)
    log_every = int(tcfg.log_interval)
    max_norm = float(tcfg.max_grad_norm) if tcfg.max_grad_norm else float("inf")
    fp16_scaler = accelerator.scaler is not None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    stop_at = int(tcfg.stop_at_step) if tcfg.get("stop_at_step") else None
    progress = tqdm(range(start, steps), initial=start, total=steps, desc="ldm", disable=not is_main)
    running_loss = torch.zeros((), device=device)
    running_norm = torch.zeros((), device=device)
    logged_steps, bad_in_a_row, bad_total = 0, 0, 0
    last_good_checkpoint = resume_from
    t_log, images_since_log = time.perf_counter(), 0
    last_loss, last_rate = float("nan"), float("nan")
    model.train()
    for step in progress:
        t_step = time.perf_counter()
        for micro in range(accum):
            seed_step(int(cfg.seed), step, micro, rank)
            position = ((step * accum + micro) * world + rank) * batch
            idx = order.indices(position, batch).to(cache.mean.device)
            z = (cache.mean[idx] + cache.std[idx] * torch.randn_like(cache.mean[idx])).to(device) * scaling
            users = cache.labels[idx].to(device)
            users = torch.where(torch.rand(users.shape, device=device) < p_uncond, torch.full_like(users, null_id), users)
            noise = torch.randn_like(z)
            timesteps = torch.randint(0, num_timesteps, (z.shape[0],), device=device)
            noisy = noise_scheduler.add_noise(z, noise, timesteps)
            if channels_last:
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            target = diffusion_target(noise_scheduler, z, noise, timesteps, prediction_type)
            with accelerator.accumulate(model), accelerator.autocast():
                pred = forward(noisy, timesteps, users)
                loss = F.mse_loss(pred.float(), target.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                    # One host sync per optimizer step: a non-finite step must be skipped, not applied.
                    finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss))
                    if finite or fp16_scaler:  # the fp16 GradScaler skips (and rescales) by itself
                        optimizer.step()
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            running_loss += loss.detach() / accum
        skipped = not finite or (fp16_scaler and accelerator.optimizer_step_was_skipped)
        if skipped:
            bad_in_a_row += 1
            bad_total += 1
            if bad_in_a_row >= int(tcfg.max_bad_steps):
                raise NonFiniteLossError(
                    f"step {step + 1}: {bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                    f"(last loss {loss.item()}). Lower train.lr, check the data, or use another precision. The last "
                    f"good checkpoint is {last_good_checkpoint or 'none (no checkpoint yet)'} and is intact.")
        else:
            bad_in_a_row = 0
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
            mean_loss = accelerator.reduce(running_loss, "mean").item() / logged_steps
            mean_norm = running_norm.item() / max(1, logged_steps)
            elapsed = time.perf_counter() - t_log
            rate = images_since_log / max(elapsed, 1e-9)
            lr = lr_scheduler.get_last_lr()[0]
            metrics = {"train/loss": mean_loss, "train/lr": lr, "train/grad_norm": mean_norm,
                       "train/images_per_sec": rate, "train/epoch": order.epoch_of(done * accum * world * batch),
                       "train/skipped_steps": bad_total}
            if device.type == "cuda":
                metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            tracker.log(metrics, step=done)
            last_loss, last_rate = mean_loss, rate
            running_loss.zero_()
            running_norm.zero_()
            logged_steps, images_since_log, t_log = 0, 0, time.perf_counter()
        if is_main and done % int(tcfg.sample_interval) == 0:
            with EMASwap(ema, unwrapped.parameters()):
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

    model.eval()
    if steps > start or ckpt.latest_checkpoint(stage_dir / "checkpoints") is None:
        last_good_checkpoint = save(steps)
    export_dir = run_dir / "export"
    if is_main:
        use_ema = bool(cfg.export.get("use_ema", True)) and ema is not None
        with EMASwap(ema if use_ema else None, unwrapped.parameters()):
            grid = sample_grid(pipeline(), cfg, dataset.users, stage_dir / "samples" / "final.png", int(cfg.seed))
            if cfg.export.enabled:
                export_pipeline(pipeline(), export_dir)
        tracker.log_image("samples/grid", grid, step=steps, caption="final, one row per user (EMA weights)")
        summary = {"final/loss": last_loss, "final/images_per_sec": last_rate, "params/denoiser": params["denoiser"],
                   "params/user_encoder": params["user_encoder"], "params/vae": params["vae"],
                   "train/skipped_steps_total": bad_total, "final/grid": str(grid)}
        if compile_seconds is not None:
            summary["train/compile_seconds"] = compile_seconds
        if device.type == "cuda":
            summary["final/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        tracker.set_summary(summary)
        log.info("LDM: final grid %s; export %s", grid, export_dir if cfg.export.enabled else "(disabled)")
    accelerator.wait_for_everyone()
    return export_dir
