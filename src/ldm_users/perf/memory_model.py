"""Training memory of the LDM stage: exact parameter counts, the static terms, a measured step, a verdict.

Static terms, exactly what ldm-train holds on the accelerator during the LDM stage:
  weights      4 B/param: accelerate's mixed precision keeps the fp32 weights (they are the master copy);
               autocast makes fp16/bf16 copies of them during the forward, which the measurement sees.
  gradients    4 B/param (fp32, like the weights).
  optimizer    AdamW: exp_avg + exp_avg_sq in fp32 = 8 B/param (an 8-bit AdamW would hold ~2.03 B/param).
  EMA          4 B/param: the diffusers EMAModel shadow copy, kept on the device (train.ema.enabled).
  frozen VAE   4 B/param (fp32, kept on the device for the sample grids) + the latent cache when it is moved
               to the device (ldm_stage moves it when it is under 20% of hardware.memory_gb).
Activations (and autocast weight copies, temporaries, optimizer/EMA scratch) are measured by running the
step: on CUDA with torch.cuda.max_memory_allocated, elsewhere by tracing every allocation on fake tensors
(no arithmetic) or, for small models, real CPU tensors. CPU traces use bf16 autocast where the profile
asks for fp16/bf16: the same ops run in 16-bit, so the bytes match.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ldm_users.errors import ConfigError
from ldm_users.models.build import model_kind
from ldm_users.perf.live_memory import LiveMemory

GIB = 2**30
ADAM_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 2 * 4 / 256}  # bitsandbytes: 2 x uint8 + fp32 absmax per 256


@dataclass(frozen=True)
class Settings:
    """The memory-relevant settings of one LDM training run."""

    precision: str = "no"      # no | fp16 | bf16
    batch: int = 1
    accum: int = 1
    gradient_checkpointing: bool = False
    channels_last: bool = False
    fused_adam: bool = False
    optimizer: str = "adamw"
    ema: bool = True

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Settings:
        hw = cfg.hardware
        return cls(precision=str(hw.mixed_precision), batch=int(hw.batch_size),
                   accum=int(hw.gradient_accumulation_steps), gradient_checkpointing=bool(hw.get("gradient_checkpointing")),
                   channels_last=bool(hw.get("channels_last")) and model_kind(cfg) == "unet",
                   fused_adam=bool(hw.get("fused_adam")), optimizer=str(hw.get("optimizer", "adamw")),
                   ema=bool(cfg.train.ema.enabled))

    def overrides(self, base: Settings) -> list[str]:
        """Command-line overrides that turn `base` into these settings."""
        out = []
        if self.gradient_checkpointing != base.gradient_checkpointing:
            out.append(f"hardware.gradient_checkpointing={str(self.gradient_checkpointing).lower()}")
        if self.batch != base.batch:
            out += [f"hardware.batch_size={self.batch}", f"hardware.gradient_accumulation_steps={self.accum}"]
        if self.ema != base.ema:
            out.append(f"train.ema.enabled={str(self.ema).lower()}")
        if self.optimizer != base.optimizer:
            out.append(f"hardware.optimizer={self.optimizer}")
        return out


def require_num_users(cfg: DictConfig) -> int:
    users = cfg.data.get("num_users")
    if users is None:
        raise ConfigError("data.num_users is not set: ldm-diagnose does not read the dataset; pass data.num_users=N "
                          "(the number of user folders).")
    return int(users)


def parameter_counts(cfg: DictConfig) -> dict[str, int]:
    """Exact parameter counts, built on the meta device (no memory, no init cost)."""
    from ldm_users.models.build import build_denoiser, build_vae

    require_num_users(cfg)
    with torch.device("meta"):
        vae = build_vae(cfg)
        model = build_denoiser(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0
    return {"vae": count(vae), "denoiser": count(model.backbone), "user_encoder": count(model.condition)}


def latent_shape(cfg: DictConfig) -> tuple[int, int, int]:
    den = cfg.model.denoiser
    return int(den.in_channels), int(den.sample_size), int(den.sample_size)


def latent_cache_bytes(cfg: DictConfig) -> int | None:
    """Bytes of the latent cache (mean + std + labels) when the dataset size is known from the config."""
    if cfg.data.name != "synthetic":
        return None
    n = int(cfg.data.num_users) * int(cfg.data.images_per_user)
    c, h, w = latent_shape(cfg)
    return n * c * h * w * 4 * 2 + n * 8


def static_bytes(cfg: DictConfig, counts: dict[str, int], s: Settings) -> dict[str, int]:
    trainable = counts["denoiser"] + counts["user_encoder"]
    out = {"weights": 4 * trainable, "gradients": 4 * trainable,
           "optimizer": int(ADAM_STATE_BYTES[s.optimizer] * trainable), "ema": 4 * trainable if s.ema else 0,
           "vae": 4 * counts["vae"]}
    cache = latent_cache_bytes(cfg)
    on_device = cache is not None and cache < 0.2 * float(cfg.hardware.memory_gb) * GIB
    out["latent_cache"] = cache if on_device else 0
    return out


# -- measuring one training step ----------------------------------------------------------------------------

class _Meter:
    """Live bytes now / peak, from the CUDA allocator or from a LiveMemory trace."""

    def __init__(self, device: torch.device, live: LiveMemory | None):
        self.device, self.live = device, live

    def current(self) -> int:
        return self.live.current if self.live is not None else torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return self.live.peak if self.live is not None else torch.cuda.max_memory_allocated(self.device)


def _autocast(device: torch.device, precision: str, fake_or_cpu: bool):
    if precision == "no":
        return contextlib.nullcontext()
    if fake_or_cpu:  # CPU autocast runs the same op list in 16 bits: bf16 stands in for fp16 (same bytes)
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


@dataclass
class StepMemory:
    peak: int          # live bytes at the worst moment of a steady-state optimizer step (the model included)
    activations: int   # growth over one forward: saved activations + autocast weight copies
    method: str        # how it was measured


def measure_step(cfg: DictConfig, s: Settings, method: str = "fake", limit_bytes: int | None = None) -> StepMemory:
    """Run two optimizer steps of the denoiser with these settings and measure the second (steady state).

    method: "fake" (shapes only, any size, on CPU), "cpu" (real arithmetic on CPU: small models only),
    "cuda" (the current GPU). Mirrors training/step.py: accumulation, autocast, clip, AdamW, EMA.
    """
    from diffusers.training_utils import EMAModel

    from ldm_users.models.build import build_denoiser

    num_users = require_num_users(cfg)
    device = torch.device("cuda" if method == "cuda" else "cpu")
    traced = method != "cuda"
    if method == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    mode = contextlib.nullcontext()
    if method == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode()
    with mode:
        live = LiveMemory(limit_bytes) if traced else None
        meter = _Meter(device, live)
        with torch.device(device):
            model = build_denoiser(cfg)
        if s.gradient_checkpointing:
            model.backbone.enable_gradient_checkpointing()
        # channels_last changes strides, not bytes; fake parameters cannot be converted (module.to swaps them).
        if s.channels_last and method != "fake":
            model = model.to(memory_format=torch.channels_last)
        if live is not None:
            live.track(model)
        with (live if live is not None else contextlib.nullcontext()):
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            impl = {"fused": True} if s.fused_adam else {"foreach": True}
            optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, **impl)
            ema = EMAModel(params, foreach=True) if s.ema else None
            if ema is not None:
                ema.to(device)
            c, h, w = latent_shape(cfg)
            activations = 0
            for step in range(2):
                if step == 1:
                    if live is not None:
                        live.reset_peak()
                    elif method == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                micros = min(s.accum, 2)  # the 2nd micro-batch already carries the 1st one's gradients
                for micro in range(micros):
                    x = torch.randn(s.batch, c, h, w, device=device)
                    if s.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    t = torch.randint(0, 1000, (s.batch,), device=device)
                    users = torch.randint(0, num_users, (s.batch,), device=device)
                    before = meter.current()
                    # As in training/step.py: only the forward and the loss run under autocast.
                    with _autocast(device, s.precision, traced):
                        pred = model(x, t, users)
                        loss = F.mse_loss(pred.float(), x.float())
                    activations = max(activations, meter.current() - before)
                    loss.backward()
                    del pred, loss
                    if micro == micros - 1:
                        torch.nn.utils.clip_grad_norm_(params, 1.0)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.step(params)
            peak = meter.peak() - (base if method == "cuda" else 0)
    label = {"fake": "traced on fake tensors (CPU)", "cpu": "measured on CPU", "cuda": "measured on CUDA"}[method]
    return StepMemory(peak=int(peak), activations=int(activations), method=label)


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
