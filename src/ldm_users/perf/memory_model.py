"""Training memory of the LDM stage: exact parameter counts, the static terms, a measured step, a verdict.

Static terms, exactly what ldm-train holds on the accelerator during the LDM stage:
  weights      4 B/param: accelerate's mixed precision keeps the fp32 weights (they are the master copy);
               autocast makes fp16/bf16 copies of them during the forward, which the measurement sees.
  gradients    4 B/param (fp32, like the weights).
  optimizer    AdamW: exp_avg + exp_avg_sq in fp32 = 8 B/param (an 8-bit AdamW would hold ~2.03 B/param).
  EMA          4 B/param: the diffusers EMAModel shadow copy, kept on the device (train.ema.enabled).
  frozen VAE   4 B/param (fp32, kept on the device for the sample grids) + the latent cache when it is moved
               to the device (ldm_stage moves it when it is under 20% of hardware.memory_gb).
Activations (and autocast weight copies, temporaries, optimizer/EMA scratch) are measured by running ldm-train's
own step, built by training/trainer.py: on CUDA with torch.cuda.max_memory_allocated, elsewhere by tracing every
allocation on fake tensors (no arithmetic) or, for small models, real CPU tensors. CPU traces use bf16 autocast
where the profile asks for fp16/bf16: the same ops run in 16-bit, so the bytes match.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from omegaconf import DictConfig, open_dict
from torch._subclasses.fake_tensor import FakeTensorMode

from ldm_users.errors import ConfigError
from ldm_users.models.build import build_denoiser, build_vae, latent_shape, model_family
from ldm_users.perf.live_memory import PeakMemory
from ldm_users.training.latent_cache import Augment, LatentCache
from ldm_users.training.trainer import build_ldm_trainer, reset_accelerator_state

GIB = 2**30
# AdamW's two fp32 states; an 8-bit AdamW (bitsandbytes: 2 x uint8 + an fp32 absmax per 256) is only quoted in
# the "does not fit" note, ldm-train has none.
ADAM_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 2 * 4 / 256}


@dataclass(frozen=True)
class Settings:
    """The memory-relevant settings of one LDM training run."""

    precision: str = "no"      # no | fp16 | bf16
    batch: int = 1
    accum: int = 1
    gradient_checkpointing: bool = False
    channels_last: bool = False
    fused_adam: bool = False
    ema: bool = True

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Settings:
        hw = cfg.hardware
        from ldm_users.training.common import effective_precision

        return cls(precision=effective_precision(hw), batch=int(hw.batch_size),
                   accum=int(hw.gradient_accumulation_steps), gradient_checkpointing=bool(hw.get("gradient_checkpointing")),
                   channels_last=bool(hw.get("channels_last")) and model_family(cfg).channels_last,
                   fused_adam=bool(hw.get("fused_adam")), ema=bool(cfg.train.ema.enabled))

    def apply(self, cfg: DictConfig) -> DictConfig:
        """A copy of cfg that trains with these settings."""
        out = cfg.copy()
        with open_dict(out):
            hw = out.hardware
            hw.mixed_precision, hw.batch_size, hw.gradient_accumulation_steps = self.precision, self.batch, self.accum
            hw.gradient_checkpointing, hw.channels_last = self.gradient_checkpointing, self.channels_last
            hw.fused_adam = self.fused_adam
            out.train.ema.enabled = self.ema
        return out

    def overrides(self, base: Settings) -> list[str]:
        """Command-line overrides that turn `base` into these settings."""
        out = []
        if self.gradient_checkpointing != base.gradient_checkpointing:
            out.append(f"hardware.gradient_checkpointing={str(self.gradient_checkpointing).lower()}")
        if self.batch != base.batch:
            out += [f"hardware.batch_size={self.batch}", f"hardware.gradient_accumulation_steps={self.accum}"]
        if self.ema != base.ema:
            out.append(f"train.ema.enabled={str(self.ema).lower()}")
        return out


def require_num_users(cfg: DictConfig) -> int:
    users = cfg.data.get("num_users")
    if users is None:
        raise ConfigError("data.num_users is not set: ldm-diagnose does not read the dataset; pass data.num_users=N "
                          "(the number of user folders).")
    return int(users)


def parameter_counts(cfg: DictConfig) -> dict[str, int]:
    """Exact parameter counts, built on the meta device (no memory, no init cost)."""
    require_num_users(cfg)
    with torch.device("meta"):
        vae = build_vae(cfg)
        model = build_denoiser(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0
    return {"vae": count(vae), "denoiser": count(model.backbone), "user_encoder": count(model.condition)}


def latent_cache_bytes(cfg: DictConfig) -> int | None:
    """Bytes of the latent cache (mean + std + labels, for every augmented variant) when the dataset size is known
    from the config."""
    if cfg.data.name != "synthetic":
        return None
    n = int(cfg.data.num_users) * int(cfg.data.images_per_user) * len(Augment.from_cfg(cfg).variants)
    c, h, w = latent_shape(cfg)
    return n * c * h * w * 4 * 2 + n * 8


def static_bytes(cfg: DictConfig, counts: dict[str, int], s: Settings) -> dict[str, int]:
    trainable = counts["denoiser"] + counts["user_encoder"]
    out = {"weights": 4 * trainable, "gradients": 4 * trainable,
           "optimizer": int(ADAM_STATE_BYTES["adamw"] * trainable), "ema": 4 * trainable if s.ema else 0,
           "vae": 4 * counts["vae"]}
    cache = latent_cache_bytes(cfg)
    on_device = cache is not None and cache < 0.2 * float(cfg.hardware.memory_gb) * GIB
    out["latent_cache"] = cache if on_device else 0
    return out


# -- measuring one training step ----------------------------------------------------------------------------

def placeholder_users(cfg: DictConfig) -> list[str]:
    """Names for data.num_users users (the measurements need the count, not the dataset)."""
    return [f"user_{i:02d}" for i in range(require_num_users(cfg))]


def random_latents(cfg: DictConfig, n: int, device, seed: int = 0) -> LatentCache:
    """A latent cache of n random posteriors, standing in for the dataset's (speed and memory, not quality)."""
    c, h, w = latent_shape(cfg)
    g = torch.Generator().manual_seed(seed)
    return LatentCache(mean=torch.randn(n, c, h, w, generator=g), std=0.1 * torch.rand(n, c, h, w, generator=g),
                       labels=torch.randint(0, require_num_users(cfg), (n,), generator=g), path=Path("random")).to(device)


@dataclass
class StepMemory:
    peak: int          # live bytes at the worst moment of a steady-state optimizer step (the model included)
    activations: int   # growth over one forward: saved activations + autocast weight copies
    method: str        # how it was measured


def measure_step(cfg: DictConfig, s: Settings, method: str = "fake", limit_bytes: int | None = None) -> StepMemory:
    """Run two optimizer steps of ldm-train's own LDM step (training/trainer.py) with these settings and measure
    the second (steady state). method: "fake" (shapes only, any size, on CPU), "cpu" (real arithmetic on CPU:
    small models only), "cuda" (the current GPU).

    Where this differs from a training run, and why:
    - at most 2 micro-batches per step: from the second on, each holds the gradients of those before it, so more
      only cost time;
    - CPU traces run fp16 profiles as bf16 autocast (CPU autocast and accelerate have no fp16 there; the same ops
      run in 16 bits, so the bytes match);
    - fake tensors: no channels_last and no device placement by accelerate (fake parameters cannot be converted:
      Module.to swaps them; channels_last changes strides, not bytes) and the finite check counts as passed (fake
      tensors hold no values);
    - a random latent cache of one micro-batch stands in for the dataset's (counted in static_bytes instead).
    """
    traced, fake = method != "cuda", method == "fake"
    run_cfg = replace(s, accum=min(s.accum, 2), channels_last=s.channels_last and not fake).apply(cfg)
    device = torch.device("cpu" if traced else "cuda")
    precision = "bf16" if traced and s.precision == "fp16" else s.precision
    base = 0
    if not traced:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
    reset_accelerator_state()
    activations = [0]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
            accelerator = Accelerator(mixed_precision=precision, cpu=traced, device_placement=not fake,
                                      gradient_accumulation_steps=run_cfg.hardware.gradient_accumulation_steps)
            with PeakMemory(device, limit_bytes=limit_bytes if traced else None) as meter:
                trainer = build_ldm_trainer(run_cfg, accelerator, placeholder_users(cfg),
                                            random_latents(run_cfg, s.batch, device), 1.0, num_steps=2,
                                            compile_model=False)
                step = trainer.step
                if fake:
                    step.check_finite = lambda loss, grad_norm: True
                forward = step.forward

                def measured_forward(*args):
                    before = meter.current()
                    out = forward(*args)
                    activations[0] = max(activations[0], meter.current() - before)
                    return out

                step.forward = measured_forward
                step(0)
                meter.reset_peak()
                step(1)
                peak = meter.peak - base
    finally:
        reset_accelerator_state()  # the next Accelerator of this process may want another precision
    label = {"fake": "traced on fake tensors (CPU)", "cpu": "measured on CPU", "cuda": "measured on CUDA"}[method]
    return StepMemory(peak=int(peak), activations=int(activations[0]), method=label)

# -- the verdict ------------------------------------------------------------------------------------------------

@dataclass
class Verdict:
    fits: bool
    need_gib: float     # (peak + VAE + latent cache) x (1 + fragmentation) + reserve
    budget_gib: float   # hardware.memory_gb
    headroom_gib: float

    @property
    def label(self) -> str:
        return "fits" if self.fits else "does not fit"


def verdict(peak_bytes: int, extra_bytes: int, memory_gb: float, reserve_gib: float, fragmentation: float) -> Verdict:
    """memory_gb is read as GiB (GPU makers' "8 GB" cards hold 8 GiB). The reserve covers the CUDA context
    and cuBLAS/cuDNN workspaces, which no allocator statistic includes; fragmentation the allocator's rounding."""
    need = (peak_bytes + extra_bytes) * (1 + fragmentation) / GIB + reserve_gib
    return Verdict(fits=need <= float(memory_gb), need_gib=need, budget_gib=float(memory_gb),
                   headroom_gib=float(memory_gb) - need)


def usable_bytes(memory_gb: float, reserve_gib: float, fragmentation: float, extra_bytes: int = 0) -> int:
    """The live-tensor budget the verdict allows a step (what a capped allocator should be given)."""
    return int(((float(memory_gb) - reserve_gib) * GIB / (1 + fragmentation)) - extra_bytes)


@dataclass
class ProfileReport:
    profile: str
    settings: dict
    static: dict
    measured: dict
    verdict: dict
    fix: list[str]         # overrides that make it fit (empty when it fits as is)
    fix_note: str


def assess(cfg: DictConfig, counts: dict[str, int], method: str, reserve_gib: float, fragmentation: float,
           try_fixes: bool = True) -> ProfileReport:
    """Measure the configured step on this profile, give a verdict, and search for the cheapest change that fits."""
    s = Settings.from_cfg(cfg)
    static = static_bytes(cfg, counts, s)
    extra = static["vae"] + static["latent_cache"]
    mem = measure_step(cfg, s, method)
    v = verdict(mem.peak, extra, cfg.hardware.memory_gb, reserve_gib, fragmentation)
    fix, note = [], ""
    if not v.fits and try_fixes:
        fix, note = find_fix(cfg, counts, s, method, reserve_gib, fragmentation)
    measured = {"peak_bytes": mem.peak, "activation_bytes": mem.activations, "method": mem.method}
    return ProfileReport(profile=str(cfg.hardware.name), settings=asdict(s), static=static, measured=measured,
                         verdict=asdict(v) | {"label": v.label}, fix=fix, fix_note=note)


def _candidates(s: Settings):
    """Changes in the order of what they cost: recomputation, then the EMA copy, then smaller micro-batches
    (same effective batch via accumulation, more steps)."""
    if not s.gradient_checkpointing:
        yield replace(s, gradient_checkpointing=True)
        s = replace(s, gradient_checkpointing=True)
    if s.ema:
        yield replace(s, ema=False)
        s = replace(s, ema=False)
    batch = s.batch
    while batch > 1:
        batch //= 2
        yield replace(s, batch=batch, accum=s.accum * (s.batch // batch))


def find_fix(cfg: DictConfig, counts: dict[str, int], s: Settings, method: str, reserve_gib: float,
             fragmentation: float) -> tuple[list[str], str]:
    extra_static = static_bytes(cfg, counts, s)
    extra = extra_static["vae"] + extra_static["latent_cache"]
    memory_gb = float(cfg.hardware.memory_gb)
    for candidate in _candidates(s):
        mem = measure_step(cfg, candidate, method)
        v = verdict(mem.peak, extra, memory_gb, reserve_gib, fragmentation)
        if v.fits:
            return candidate.overrides(s), f"fits with these ({v.need_gib:.2f} of {memory_gb:g} GiB)"
    trainable = counts["denoiser"] + counts["user_encoder"]
    floor = (8 * trainable + extra) / GIB + reserve_gib
    eight_bit = (trainable * (8 + ADAM_STATE_BYTES["adamw8bit"]) + extra) / GIB + reserve_gib
    return [], (f"does not fit even with gradient checkpointing, no EMA and batch 1: the fp32 weights + gradients "
                f"alone need {floor:.1f} GiB (+AdamW states {8 * trainable / GIB:.1f} GiB; an 8-bit AdamW would "
                f"still need {eight_bit:.1f} GiB without activations). Use a smaller model or a larger GPU.")
