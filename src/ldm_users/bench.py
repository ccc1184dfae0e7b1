"""ldm-bench: the diffusers-example training loop vs ldm-train's own step, eager vs fast sampling.

    ldm-bench -m model=unet_light,unet_medium,unet_sd,dit hardware=h100_80gb
    ldm-bench experiment=bench_cpu logger=none                  # tiny, on a CPU
    ldm-bench bench.mode=memory                                  # every model x profile, GPU capped to the profile

Random weights and random data: this measures speed and memory, not quality. Writes
<results_dir>/bench_<model>_<hardware>_<device>.{md,json} and refreshes <results_dir>/bench_summary.md.
"""

from __future__ import annotations

import json
import logging
import platform
import re
from pathlib import Path

import diffusers
import hydra
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from ldm_users.config import config_dir
from ldm_users.errors import ConfigError, exit_on_user_error
from ldm_users.inference.device import move_pipeline, resolve_device_dtype
from ldm_users.inference.export import make_pipeline
from ldm_users.inference.fast_sampling import resolve_mode, use_fast_sampling
from ldm_users.inference.samplers import make_scheduler
from ldm_users.models.build import build_denoiser, build_vae
from ldm_users.perf.configs import resolve_list, with_group
from ldm_users.perf.flops import denoiser_train_flops_per_image, peak_flops
from ldm_users.perf.live_memory import LiveMemory
from ldm_users.perf.memory_model import (
    GIB,
    assess,
    latent_cache_bytes,
    latent_shape,
    parameter_counts,
    require_num_users,
    usable_bytes,
)
from ldm_users.perf.timing import median, synchronize, time_calls

log = logging.getLogger("ldm_users.bench")


def device_of() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor()}".strip()


def _noise_scheduler(cfg, device):
    sched = instantiate(cfg.noise_scheduler)
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    return sched


def _users(cfg) -> list[str]:
    return [f"user_{i:02d}" for i in range(require_num_users(cfg))]


class PeakMemory:
    """Peak bytes of what runs inside: the CUDA allocator's statistic, or a live-tensor trace on CPU."""

    def __init__(self, device: torch.device, track=(), limit_bytes: int | None = None):
        self.device, self.track, self.limit = device, track, limit_bytes
        self.live = None
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.live = LiveMemory(self.limit).track(*self.track)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)
            self.peak = self.live.peak
        else:
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)


# -- (a) the reference: how diffusers' example scripts train --------------------------------------------------

def reference_trainer(cfg: DictConfig, device: torch.device):
    """train_text_to_image.py's loop: VAE encode each step, fp16 autocast + GradScaler on CUDA, the default
    (foreach) AdamW, no compile, no channels_last, `loss.item()` logged every step."""
    batch = int(cfg.bench.reference.batch_size)
    fp16 = device.type == "cuda"
    weight_dtype = torch.float16 if fp16 else torch.float32
    vae = build_vae(cfg).to(device, weight_dtype).eval().requires_grad_(False)
    model = build_denoiser(cfg, _users(cfg)).to(device).train()
    tcfg = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(tcfg.lr), betas=(tcfg.adam_beta1, tcfg.adam_beta2),
                                  weight_decay=float(tcfg.weight_decay))
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    sched = _noise_scheduler(cfg, device)
    num_users = require_num_users(cfg)
    res = int(cfg.data.resolution)
    g = torch.Generator(device).manual_seed(0)
    images = torch.rand(batch, 3, res, res, device=device, generator=g) * 2 - 1  # stands in for the dataloader
    labels = torch.randint(0, num_users, (batch,), device=device, generator=g)
    state = {"loss": 0.0}

    def step(_i: int) -> None:
        with torch.no_grad():
            latents = vae.encode(images.to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            pred = model(noisy, t, labels)
        loss = F.mse_loss(pred.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg.max_grad_norm or 1.0))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state["loss"] += loss.item()  # the example logs every step (a host sync)

    return step, batch, (model, vae, images, optimizer)


# -- (b) ours: the step ldm-train runs ------------------------------------------------------------------------

def our_trainer(cfg: DictConfig, device: torch.device, compile_model: bool):
    """training/step.LdmTrainStep with the profile's accelerator, optimizer, EMA and (optionally) torch.compile."""
    from accelerate.state import AcceleratorState
    from diffusers.training_utils import EMAModel

    from ldm_users.training.common import DataOrder, make_accelerator, make_lr_scheduler, make_optimizer
    from ldm_users.training.latent_cache import LatentCache
    from ldm_users.training.step import LdmTrainStep

    AcceleratorState._reset_state(reset_partial_state=True)  # one accelerator per variant, in one process
    accelerator = make_accelerator(cfg)
    hw, tcfg = cfg.hardware, cfg.train
    num_users = require_num_users(cfg)
    model = build_denoiser(cfg, _users(cfg))
    if hw.get("gradient_checkpointing"):
        model.backbone.enable_gradient_checkpointing()
    channels_last = bool(hw.get("channels_last")) and model.kind == "unet"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), float(tcfg.lr), float(tcfg.weight_decay),
                               (tcfg.adam_beta1, tcfg.adam_beta2), fused=hw.get("fused_adam", False))
    lr_scheduler = make_lr_scheduler(tcfg.lr_scheduler, optimizer, int(tcfg.warmup_steps), 10**6, 1)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    ema = None
    if tcfg.ema.enabled:
        ema = EMAModel(unwrapped.parameters(), decay=float(tcfg.ema.decay), foreach=True)
        ema.to(device)
    forward = torch.compile(model) if compile_model else model
    n = int(cfg.bench.latent_pool)
    c, h, w = latent_shape(cfg)
    g = torch.Generator().manual_seed(0)
    cache = LatentCache(mean=torch.randn(n, c, h, w, generator=g), std=0.1 * torch.rand(n, c, h, w, generator=g),
                        labels=torch.randint(0, num_users, (n,), generator=g), path=Path("random")).to(device)
    batch = int(hw.batch_size)
    step = LdmTrainStep(accelerator=accelerator, model=model, forward=forward, optimizer=optimizer,
                        lr_scheduler=lr_scheduler, noise_scheduler=_noise_scheduler(cfg, device), cache=cache,
                        order=DataOrder(n, int(cfg.seed)), scaling=0.18215, batch=batch, seed=int(cfg.seed),
                        p_uncond=float(tcfg.p_uncond), null_id=unwrapped.null_id,
                        prediction_type=str(tcfg.prediction_type), channels_last=channels_last,
                        max_norm=float(tcfg.max_grad_norm) if tcfg.max_grad_norm else float("inf"))
    model.train()

    def call(i: int) -> None:
        result = step(i)
        if ema is not None and not result.skipped:
            ema.step(unwrapped.parameters())

    held = (unwrapped, optimizer, *([ema.shadow_params] if ema is not None else []), cache.mean, cache.std)
    return call, batch * accelerator.gradient_accumulation_steps, held


def time_training(make, cfg, device) -> dict:
    call, images_per_step, held = make()
    warm, timed = time_calls(call, device, int(cfg.bench.warmup_steps), int(cfg.bench.steps))
    with PeakMemory(device, held) as mem:  # on CPU a traced extra step (the trace would distort the timing)
        call(len(warm) + len(timed))
    step_s = median(timed)
    return {"images_per_step": images_per_step, "step_s": step_s, "images_per_s": images_per_step / step_s,
            "first_step_s": warm[0] if warm else None, "peak_memory_gib": mem.peak / GIB,
            "memory_method": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "live tensors on CPU"}


# -- sampling ----------------------------------------------------------------------------------------------------

def sampling_pipeline(cfg: DictConfig, device: torch.device):
    _, dtype = resolve_device_dtype(device.type, "auto")
    vae = build_vae(cfg).eval()
    denoiser = build_denoiser(cfg, _users(cfg)).eval()
    scheduler = make_scheduler(cfg.sampler, instantiate(cfg.noise_scheduler).config)
    pipe = make_pipeline(vae, denoiser, scheduler, _users(cfg))
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


# -- the report ----------------------------------------------------------------------------------------------------

def _ratio(ours, ref):
    return ours / ref if ours is not None and ref not in (None, 0) else None


def build_rows(result: dict) -> list[dict]:
    ref, ours = result["train"]["reference"], result["train"]["ours"]
    eager = result["train"].get("ours_eager")
    rows = [
        {"metric": "train images/s", "reference": ref["images_per_s"], "ours": ours["images_per_s"]},
        {"metric": "train step (ms)", "reference": 1e3 * ref["step_s"], "ours": 1e3 * ours["step_s"]},
        {"metric": "images per step", "reference": ref["images_per_step"], "ours": ours["images_per_step"]},
        {"metric": "peak train memory (GiB)", "reference": ref["peak_memory_gib"], "ours": ours["peak_memory_gib"]},
        {"metric": "MFU (fraction of dense bf16 peak)", "reference": ref.get("mfu"), "ours": ours.get("mfu")},
    ]
    if eager is not None:
        rows.insert(1, {"metric": "train images/s, ours without compile", "reference": ref["images_per_s"],
                        "ours": eager["images_per_s"]})
        rows.append({"metric": "compile (first step, s)", "reference": None, "ours": ours["first_step_s"]})
    if "sample" in result:
        sref, sours = result["sample"]["reference"], result["sample"]["ours"]
        rows += [{"metric": f"sampling images/s (batch {sref['batch']}, {result['sample']['steps']} steps + decode)",
                  "reference": sref["images_per_s"], "ours": sours["images_per_s"]},
                 {"metric": "sampling batch 1 (s/image)", "reference": sref["batch1_s_per_image"],
                  "ours": sours["batch1_s_per_image"]}]
    for row in rows:
        row["ours/reference"] = _ratio(row["ours"], row["reference"])
    return rows


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def to_markdown(result: dict) -> str:
    env = result["env"]
    head = (f"### ldm-bench: model={result['model']} ({result['params']['denoiser'] / 1e6:.1f}M) "
            f"hardware={result['hardware']} on {env['device']}")
    about = (f"torch {env['torch']}, diffusers {env['diffusers']}. reference: {result['reference_desc']}. "
             f"ours: {result['ours_desc']}.")
    lines = [head, "", about, "", "| metric | reference | ours | ours/reference |", "|---|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['metric']} | {_fmt(row['reference'])} | {_fmt(row['ours'])} | "
                     f"{_fmt(row['ours/reference'])} |")
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_results(result: dict, results_dir: Path, run_dir: Path | None, stem: str) -> tuple[Path, Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    md, js = results_dir / f"{stem}.md", results_dir / f"{stem}.json"
    text = result["markdown"] = to_markdown(result) if result.get("rows") else result["markdown"]
    md.write_text(text)
    js.write_text(json.dumps(result, indent=1, default=str))
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / md.name).write_text(text)
        (run_dir / js.name).write_text(js.read_text())
    # One page with every run in the folder (a sweep writes one file per job).
    pages = [p for p in sorted(results_dir.glob("bench*.md")) if p.name != "bench_summary.md"]
    (results_dir / "bench_summary.md").write_text("\n".join(p.read_text() for p in pages))
    return md, js


def describe(cfg, device) -> tuple[str, str]:
    hw = cfg.hardware
    ref = (f"VAE encode every step, {'fp16 autocast + GradScaler' if device.type == 'cuda' else 'fp32'}, "
           f"default AdamW, eager, batch {cfg.bench.reference.batch_size}; sampling eager")
    precision = hw.mixed_precision if device.type == "cuda" else "fp32 (no GPU)"
    ours = (f"cached latents, {precision}, {'fused' if hw.fused_adam and device.type == 'cuda' else 'default'} AdamW, "
            f"{'channels_last, ' if hw.channels_last else ''}"
            f"{'torch.compile, ' if hw.compile and device.type == 'cuda' else 'eager, '}"
            f"{'gradient checkpointing, ' if hw.gradient_checkpointing else ''}EMA {'on' if cfg.train.ema.enabled else 'off'}, "
            f"batch {hw.batch_size} x {hw.gradient_accumulation_steps}; "
            f"sampling fast={resolve_mode(str(cfg.bench.sample.fast), device)}")
    return ref, ours


def run_speed(cfg: DictConfig, device: torch.device) -> dict:
    num_users = require_num_users(cfg)
    compile_model = bool(cfg.hardware.get("compile")) and device.type == "cuda"
    train = {"reference": time_training(lambda: reference_trainer(cfg, device), cfg, device)}
    _release(device)
    if compile_model and cfg.bench.compare_eager:
        train["ours_eager"] = time_training(lambda: our_trainer(cfg, device, False), cfg, device)
        _release(device)
    train["ours"] = time_training(lambda: our_trainer(cfg, device, compile_model), cfg, device)
    _release(device)
    flops = denoiser_train_flops_per_image(lambda: build_denoiser(cfg), latent_shape(cfg), num_users)
    peak = peak_flops(device, cfg.bench.get("peak_tflops"))
    for variant in train.values():
        variant["mfu"] = flops * variant["images_per_s"] / peak if peak else None
    ref_desc, ours_desc = describe(cfg, device)
    result = {"model": str(cfg.model.name), "hardware": str(cfg.hardware.name), "train": train,
              "train_flops_per_image": flops, "peak_flops": peak, "reference_desc": ref_desc, "ours_desc": ours_desc}
    if cfg.bench.sample.enabled:
        pipe, dtype = sampling_pipeline(cfg, device)
        result["sample"] = {"steps": int(cfg.bench.sample.num_inference_steps), "dtype": str(dtype),
                            "reference": time_sampling(pipe, cfg, device, "off"),
                            "ours": time_sampling(pipe, cfg, device, str(cfg.bench.sample.fast))}
        del pipe
        _release(device)
    return result


def _release(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- memory truth ---------------------------------------------------------------------------------------------------

def capped_run(cfg: DictConfig, device: torch.device, reserve_gib: float, fragmentation: float) -> dict:
    """Two real optimizer steps of ldm-train's step, the GPU capped to the profile's memory (or, on a CPU,
    the same cap enforced on a live-tensor trace). The frozen VAE and the latent cache are held on the device
    as in ldm-train."""
    memory_gb = float(cfg.hardware.memory_gb)
    cap_gib = memory_gb - reserve_gib
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if cap_gib * GIB > total:
            return {"fits": None, "peak_gib": None, "note": f"profile needs a GPU of {memory_gb:g} GiB; this one has "
                                                            f"{total / GIB:.1f}"}
        torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / total, device)
    limit = None if device.type == "cuda" else usable_bytes(memory_gb, reserve_gib, fragmentation)
    held = []
    try:
        with PeakMemory(device, (), limit) as mem:
            held.append(build_vae(cfg).to(device).requires_grad_(False))
            extra = latent_cache_bytes(cfg)
            if extra:
                held.append(torch.empty(extra, dtype=torch.uint8, device=device))
            call, _, _ = our_trainer(cfg, device, compile_model=False)
            call(0)
            call(1)
        return {"fits": True, "peak_gib": mem.peak / GIB, "note": ""}
    except torch.OutOfMemoryError as err:
        return {"fits": False, "peak_gib": None, "note": str(err).splitlines()[0][:160]}
    finally:
        held.clear()
        _release(device)
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)


def run_memory(cfg: DictConfig, device: torch.device) -> dict:
    mcfg = cfg.bench.memory
    reserve, frag = float(mcfg.reserve_gib), float(mcfg.fragmentation)
    rows = []
    for model in resolve_list(mcfg.models, "model", str(cfg.model.name)):
        for profile in resolve_list(mcfg.profiles, "hardware", str(cfg.hardware.name)):
            pcfg = with_group(with_group(cfg, "model", model), "hardware", profile)
            if mcfg.get("memory_gb") is not None:
                with open_dict(pcfg):
                    pcfg.hardware.memory_gb = float(mcfg.memory_gb)
            predicted = assess(pcfg, parameter_counts(pcfg), "cuda" if device.type == "cuda" else "fake", reserve, frag,
                               try_fixes=False)
            measured = capped_run(pcfg, device, reserve, frag)
            rows.append({"model": model, "profile": profile, "memory_gb": float(pcfg.hardware.memory_gb),
                         "predicted_fits": predicted.verdict["fits"], "predicted_need_gib": predicted.verdict["need_gib"],
                         "predicted_peak_gib": predicted.measured["peak_bytes"] / GIB,
                         "measured_fits": measured["fits"], "measured_peak_gib": measured["peak_gib"],
                         "agree": None if measured["fits"] is None else measured["fits"] == predicted.verdict["fits"],
                         "note": measured["note"]})
    lines = ["### ldm-bench memory truth: ldm-diagnose's verdict vs a real capped run", "",
             "| model | profile | GiB | diagnose: need | diagnose | run: peak | run | agree |", "|---|---|---:|---:|---|---:|---|---|"]
    for r in rows:
        verdict = lambda f: "n/a" if f is None else ("fits" if f else "does not fit")
        lines.append(f"| {r['model']} | {r['profile']} | {r['memory_gb']:g} | {r['predicted_need_gib']:.2f} | "
                     f"{verdict(r['predicted_fits'])} | {_fmt(r['measured_peak_gib'])} | {verdict(r['measured_fits'])} "
                     f"| {_fmt(r['agree'])} |")
    return {"mode": "memory", "rows": None, "memory_rows": rows, "markdown": "\n".join(lines) + "\n"}


# -- entry point ------------------------------------------------------------------------------------------------------

def env_info(device: torch.device) -> dict:
    return {"device": device_name(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def run(cfg: DictConfig, run_dir: Path | None = None) -> dict:
    device = device_of()
    mode = str(cfg.bench.mode)
    if mode not in ("speed", "memory"):
        raise ConfigError(f"bench.mode={mode}: use speed or memory.")
    if mode == "memory":
        result = run_memory(cfg, device)
        stem = f"bench-memory_{_slug(device_name(device))}"
    else:
        result = run_speed(cfg, device)
        result["params"] = parameter_counts(cfg)
        stem = f"bench_{cfg.model.name}_{cfg.hardware.name}_{_slug(device_name(device))}"
    result["env"] = env_info(device)
    if mode == "speed":
        result["rows"] = build_rows(result)
    md, js = write_results(result, Path(str(cfg.bench.results_dir)), run_dir, stem)
    print(result["markdown"])
    print(f"ldm-bench: wrote {md} and {js}")
    _log(cfg, result, run_dir)
    return result


def _log(cfg, result: dict, run_dir: Path | None) -> None:
    from ldm_users.tracking import make_tracker

    # Outside a Hydra app there is no run dir: track next to the results, never into the current directory.
    tracker = make_tracker(cfg, run_dir or Path(str(cfg.bench.results_dir)), "bench", True)
    try:
        metrics = {}
        for row in result.get("rows") or []:
            key = _slug(row["metric"]).replace("-", "_")
            for col in ("reference", "ours", "ours/reference"):
                if isinstance(row[col], (int, float)):
                    metrics[f"bench/{key}/{col.replace('/', '_over_')}"] = row[col]
        for row in result.get("memory_rows") or []:
            metrics[f"memory/{row['model']}/{row['profile']}/agree"] = row["agree"]
        tracker.log(metrics)
        tracker.set_summary(metrics)
    finally:
        tracker.finish(0)


@hydra.main(config_path=config_dir(), config_name="bench", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
