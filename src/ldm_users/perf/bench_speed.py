"""ldm-bench's speed runs: a diffusers-example training loop against ldm-train's own step, eager against fast
sampling. Both training loops do the same work per optimizer step: `bench.batch_size` images (default: the
hardware profile's batch), no accumulation, random weights and data (speed, not quality)."""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, open_dict

from ldm_users.inference.device import move_pipeline, resolve_device_dtype
from ldm_users.inference.export import make_pipeline
from ldm_users.inference.fast_sampling import resolve_mode, use_fast_sampling
from ldm_users.inference.samplers import make_scheduler
from ldm_users.models.build import build_denoiser, build_vae
from ldm_users.models.flops import denoiser_train_flops_per_image
from ldm_users.perf.flops import peak_flops
from ldm_users.perf.live_memory import PeakMemory
from ldm_users.perf.memory_model import GIB, latent_shape, placeholder_users, random_latents
from ldm_users.perf.timing import median, time_calls
from ldm_users.training.common import make_accelerator
from ldm_users.training.objectives import build_objective, make_noise_scheduler
from ldm_users.training.trainer import build_ldm_trainer, reset_accelerator_state

SD_LATENT_SCALE = 0.18215  # a realistic latent magnitude for random latents


def bench_batch(cfg: DictConfig) -> int:
    """Images per optimizer step for both loops."""
    value = cfg.bench.get("batch_size")
    return int(value) if value is not None else int(cfg.hardware.batch_size)


def reference_trainer(cfg: DictConfig, device: torch.device):
    """train_text_to_image.py's loop: VAE encode each step, fp16 autocast + GradScaler on CUDA, the default
    (foreach) AdamW, no compile, no channels_last, `loss.item()` logged every step."""
    batch = bench_batch(cfg)
    fp16 = device.type == "cuda"
    weight_dtype = torch.float16 if fp16 else torch.float32
    vae = build_vae(cfg).to(device, weight_dtype).eval().requires_grad_(False)
    users = placeholder_users(cfg)
    model = build_denoiser(cfg, users).to(device).train()
    tcfg = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(tcfg.lr), betas=(tcfg.adam_beta1, tcfg.adam_beta2),
                                  weight_decay=float(tcfg.weight_decay))
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    # The same training target as ours (DDPM add_noise, or flow matching for flux, as diffusers' scripts for each).
    objective = build_objective(cfg, make_noise_scheduler(cfg, device))
    res = int(cfg.data.resolution)
    g = torch.Generator(device).manual_seed(0)
    images = torch.rand(batch, 3, res, res, device=device, generator=g) * 2 - 1  # stands in for the dataloader
    labels = torch.randint(0, len(users), (batch,), device=device, generator=g)
    state = {"loss": 0.0}

    def step(_i: int) -> None:
        with torch.no_grad():
            latents = vae.encode(images.to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = objective.sample_timesteps(batch, device)
        noisy = objective.noisy(latents, noise, t)
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            pred = model(noisy, t, labels)
        loss = F.mse_loss(pred.float(), objective.target(latents, noise, t).float())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg.max_grad_norm or 1.0))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state["loss"] += loss.item()  # the example logs every step (a host sync)

    return step, batch, (model, vae, images, optimizer)


def our_trainer(cfg: DictConfig, device: torch.device, compile_model: bool):
    """ldm-train's LDM trainer (training/trainer.py) with the profile's accelerator, optimizer and EMA, at the
    bench batch without accumulation, over a pool of random cached latents."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.hardware.batch_size, cfg.hardware.gradient_accumulation_steps = bench_batch(cfg), 1
    reset_accelerator_state()  # one accelerator per variant, in one process
    accelerator = make_accelerator(cfg)
    cache = random_latents(cfg, int(cfg.bench.latent_pool), device)
    trainer = build_ldm_trainer(cfg, accelerator, placeholder_users(cfg), cache, SD_LATENT_SCALE, num_steps=10**6,
                                compile_model=compile_model)
    trainer.model.train()
    ema = [trainer.ema.shadow_params] if trainer.ema is not None else []
    held = (trainer.unwrapped, trainer.optimizer, *ema, cache.mean, cache.std)
    return trainer.step, bench_batch(cfg), held


def time_training(make, cfg, device) -> dict:
    call, images_per_step, held = make()
    warm, timed = time_calls(call, device, int(cfg.bench.warmup_steps), int(cfg.bench.steps))
    with PeakMemory(device, held) as mem:  # on CPU a traced extra step (the trace would distort the timing)
        call(len(warm) + len(timed))
    step_s = median(timed)
    return {"images_per_step": images_per_step, "step_s": step_s, "images_per_s": images_per_step / step_s,
            "first_step_s": warm[0] if warm else None, "peak_memory_gib": mem.peak / GIB,
            "memory_method": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "live tensors on CPU"}


def sampling_pipeline(cfg: DictConfig, device: torch.device):
    _, dtype = resolve_device_dtype(device.type, "auto")
    users = placeholder_users(cfg)
    vae = build_vae(cfg).eval()
    denoiser = build_denoiser(cfg, users).eval()
    scheduler = make_scheduler(cfg.sampler, make_noise_scheduler(cfg, "cpu").config)
    pipe = make_pipeline(vae, denoiser, scheduler, users, latent_shape(cfg)[-1])
    return move_pipeline(pipe, device, dtype), dtype


def time_sampling(pipe, cfg, device, fast: str) -> dict:
    scfg = cfg.bench.sample
    use_fast_sampling(pipe, fast)
    num_users = len(pipe.user_names)
    big = int(scfg.batch_size)
    kwargs = {"num_inference_steps": int(scfg.num_inference_steps), "guidance_scale": float(scfg.guidance_scale),
              "output_type": "pt", "show_progress": False}

    def batch_call(_i):
        pipe(users=[i % num_users for i in range(big)], batch_size=big, **kwargs)

    def single_call(_i):
        pipe(users=[0], **kwargs)

    _, big_t = time_calls(batch_call, device, 1, int(scfg.repeats))
    first, one_t = time_calls(single_call, device, 1, int(scfg.batch1_repeats))
    return {"batch": big, "images_per_s": big / median(big_t), "batch1_s_per_image": median(one_t),
            "batch1_first_call_s": first[0]}


def describe(cfg, device) -> tuple[str, str, str]:
    """(what is compared, the reference, ours) in words, for the table."""
    hw, batch = cfg.hardware, bench_batch(cfg)
    compared = f"both loops train on the same {batch} images per optimizer step (batch {batch}, no accumulation)"
    ref = (f"VAE encode every step, {'fp16 autocast + GradScaler' if device.type == 'cuda' else 'fp32'}, "
           f"default AdamW, eager; sampling eager")
    precision = {"no": "fp32", None: "accelerate's precision"}.get(hw.mixed_precision, hw.mixed_precision)
    ours = (f"cached latents, {precision}, {'fused' if hw.fused_adam else 'default'} AdamW, "
            f"{'channels_last, ' if hw.channels_last else ''}"
            f"{'torch.compile, ' if hw.compile else 'eager, '}"
            f"{'gradient checkpointing, ' if hw.gradient_checkpointing else ''}"
            f"EMA {'on' if cfg.train.ema.enabled else 'off'}; "
            f"sampling fast={resolve_mode(str(cfg.bench.sample.fast), device)}")
    return compared, ref, ours


def run_speed(cfg: DictConfig, device: torch.device) -> dict:
    compile_model = bool(cfg.hardware.get("compile"))
    train = {"reference": time_training(lambda: reference_trainer(cfg, device), cfg, device)}
    release(device)
    if compile_model and cfg.bench.compare_eager:
        train["ours_eager"] = time_training(lambda: our_trainer(cfg, device, False), cfg, device)
        release(device)
    train["ours"] = time_training(lambda: our_trainer(cfg, device, compile_model), cfg, device)
    release(device)
    flops = denoiser_train_flops_per_image(lambda: build_denoiser(cfg), latent_shape(cfg), len(placeholder_users(cfg)))
    peak = peak_flops(device, cfg.bench.get("peak_tflops"))
    for variant in train.values():
        variant["mfu"] = flops * variant["images_per_s"] / peak if peak else None
    compared, ref_desc, ours_desc = describe(cfg, device)
    result = {"model": str(cfg.model.name), "hardware": str(cfg.hardware.name), "train": train,
              "train_flops_per_image": flops, "peak_flops": peak, "compared": compared, "reference_desc": ref_desc,
              "ours_desc": ours_desc}
    if cfg.bench.sample.enabled:
        pipe, dtype = sampling_pipeline(cfg, device)
        result["sample"] = {"steps": int(cfg.bench.sample.num_inference_steps), "dtype": str(dtype),
                            "reference": time_sampling(pipe, cfg, device, "off"),
                            "ours": time_sampling(pipe, cfg, device, str(cfg.bench.sample.fast))}
        del pipe
        release(device)
    return result


def release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
