"""ldm-bench bench.mode=fast_paths: every training fast path's speed against fp32 eager, on this machine.

Each variant is ldm-train's own LDM trainer (training/trainer.py) with one hardware setting changed from the
composed profile with fp32 eager defaults (`bench.fast_paths.variants`: name -> hardware overrides, plus one that
is not a hardware key: `sdpa=<SDPBackend name>` runs its steps inside torch's sdpa_kernel). All variants are built first and then timed in `repeats` interleaved rounds of `steps` optimizer steps
each (after one untimed step), each variant right after an fp32 eager timing, so a load that comes and goes on a
shared machine hits both sides of a ratio alike; the table gives each variant's median ratio with its spread over
the rounds (a wide spread means the machine was busy; fp32 eager's own row compares consecutive baseline
timings). A variant's first step (torch.compile compiles there) is reported, not timed. A variant that fails is a
row with its error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time

import torch
from omegaconf import DictConfig, open_dict

from ldm_users.formatting import fmt
from ldm_users.perf.memory_model import placeholder_users, random_latents
from ldm_users.training.common import make_accelerator
from ldm_users.training.trainer import build_ldm_trainer, reset_accelerator_state

log = logging.getLogger(__name__)
BASELINE = "fp32_eager"
# The profile keys a variant starts from: fp32, eager, no fused optimizer, nothing else on.
EAGER = {"mixed_precision": "no", "compile": False, "fused_adam": False, "channels_last": False,
         "gradient_checkpointing": False, "attention": "sdpa", "num_threads": None}
EXTRA_KEYS = ("sdpa",)
DEFAULT_THREADS = torch.get_num_threads()


class Variant:
    def __init__(self, name: str, cfg: DictConfig, overrides: dict):
        self.name, self.cfg, self.overrides = name, cfg, overrides
        self.trainer = self.error = self.first_step_s = None
        self.ratios: list[float] = []
        self.steps_per_s: list[float] = []

    @contextlib.contextmanager
    def active(self):
        """accelerate keeps the precision in a process-wide state that its autocast and unscaling read: make it
        this variant's before its steps (and its thread count: hardware.num_threads), and its attention kernel."""
        torch.set_num_threads(DEFAULT_THREADS)
        reset_accelerator_state()
        make_accelerator(self.cfg)
        sdpa = self.overrides.get("sdpa")
        try:
            if sdpa:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel([getattr(SDPBackend, str(sdpa))]):
                    yield
            else:
                yield
        finally:
            torch.set_num_threads(DEFAULT_THREADS)


def variant_config(cfg: DictConfig, overrides: dict) -> DictConfig:
    new = cfg.copy()
    with open_dict(new):
        for key, value in {**EAGER, **overrides}.items():
            if key not in EXTRA_KEYS:
                new.hardware[key] = value
        new.hardware.batch_size = int(cfg.bench.batch_size or cfg.hardware.batch_size)
        new.hardware.gradient_accumulation_steps = 1
    return new


def build(variant: Variant, cfg: DictConfig, step: int) -> None:
    try:
        with variant.active():
            accelerator = make_accelerator(variant.cfg)  # the variant's own (fp16: with its scaler)
            cache = random_latents(variant.cfg, int(cfg.bench.latent_pool), accelerator.device)
            variant.trainer = build_ldm_trainer(variant.cfg, accelerator, placeholder_users(variant.cfg), cache,
                                                0.18215, num_steps=10**6)
            variant.trainer.model.train()
            t0 = time.perf_counter()
            variant.trainer.step(step)
            variant.first_step_s = time.perf_counter() - t0
    except Exception as err:  # a path this machine cannot run is a row that says why, not a failed table
        variant.error = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        log.warning("fast path %s failed: %s", variant.name, variant.error)


def run_fast_paths(cfg: DictConfig, device: torch.device) -> dict:
    fcfg = cfg.bench.fast_paths
    names = list(fcfg.variants)
    if BASELINE not in names:
        raise ValueError(f"bench.fast_paths.variants must include {BASELINE} (the reference of every ratio)")
    variants = [Variant(n, variant_config(cfg, dict(fcfg.variants[n] or {})), dict(fcfg.variants[n] or {}))
                for n in names]
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    for v in variants:
        build(v, cfg, 0)
    steps, position = int(fcfg.steps), [1]

    def rate(v: Variant) -> float:
        with v.active():
            v.trainer.step(position[0])  # untimed: back in cache after the other variants
            t0 = time.perf_counter()
            for i in range(steps):
                v.trainer.step(position[0] + 1 + i)
            position[0] += steps + 1
            return steps / (time.perf_counter() - t0)

    base = next(v for v in variants if v.name == BASELINE)
    for _ in range(int(fcfg.repeats)):
        # Each variant right after its own fp32 eager timing: the ratio compares two adjacent measurements, so a
        # load that changes during the round cancels (the baseline's row compares it with the previous one).
        for v in variants:
            if v.error or v is base:
                continue
            reference, v_rate = rate(base), rate(v)
            base.steps_per_s.append(reference)
            v.steps_per_s.append(v_rate)
            v.ratios.append(v_rate / reference)
    base.ratios = [b / a for a, b in zip(base.steps_per_s, base.steps_per_s[1:])] or [1.0]
    rows = []
    for v in variants:
        row = {"variant": v.name, "overrides": v.overrides, "error": v.error, "first_step_s": v.first_step_s}
        if not v.error:
            row.update(steps_per_s=statistics.median(v.steps_per_s), ratio=statistics.median(v.ratios),
                       ratio_min=min(v.ratios), ratio_max=max(v.ratios))
        rows.append(row)
    result = {"mode": "fast_paths", "model": str(cfg.model.name), "hardware": str(cfg.hardware.name),
              "batch": int(variants[0].cfg.hardware.batch_size), "resolution": int(cfg.data.resolution),
              "repeats": int(fcfg.repeats), "steps": steps, "threads": DEFAULT_THREADS,
              "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0],
              "seconds": time.perf_counter() - t_start, "fast_path_rows": rows}
    result["markdown"] = fast_paths_markdown(result)
    return result


def fast_paths_markdown(result: dict) -> str:
    lines = [f"### ldm-bench bench.mode=fast_paths: model={result['model']}, batch {result['batch']}, "
             f"{result['resolution']} px, from hardware={result['hardware']}",
             "",
             f"Training steps/s of each fast path / fp32 eager's timed just before it, median over {result['repeats']} rounds "
             f"of {result['steps']} steps (min-max over the rounds in brackets); {result['threads']} torch threads unless "
             f"num_threads says otherwise; "
             f"load average {result['load_avg_before']:.1f} before, {result['load_avg_after']:.1f} after "
             f"({result['seconds']:.0f} s).",
             "",
             "| fast path | overrides | steps/s | / fp32 eager | first step (s) |",
             "|---|---|---:|---:|---:|"]
    for r in result["fast_path_rows"]:
        overrides = " ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-"
        if r["error"]:
            lines.append(f"| {r['variant']} | {overrides} | failed: {r['error']} | | |")
            continue
        lines.append(f"| {r['variant']} | {overrides} | {fmt(r['steps_per_s'], digits=3)} | "
                     f"**{r['ratio']:.2f}** ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
                     f"{fmt(r['first_step_s'], digits=2)} |")
    return "\n".join(lines) + "\n"
