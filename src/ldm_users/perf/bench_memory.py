"""ldm-bench's memory truth (bench.mode=memory): ldm-diagnose's verdict for every model x profile against a real
run of ldm-train's step capped to the profile's memory (on a GPU its memory fraction; on a CPU the same cap on a
live-tensor trace)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, open_dict

from ldm_users.perf.bench_report import fmt
from ldm_users.perf.bench_speed import release
from ldm_users.perf.configs import resolve_list, with_group
from ldm_users.perf.memory_model import (
    GIB,
    Settings,
    assess,
    latent_cache_bytes,
    measure_step,
    parameter_counts,
    static_bytes,
    usable_bytes,
)
from ldm_users.models.build import build_vae


def capped_run(cfg: DictConfig, device: torch.device, reserve_gib: float, fragmentation: float) -> dict:
    """Two real optimizer steps of ldm-train's step with the memory capped to the profile's budget, next to the
    frozen VAE and the latent cache that ldm-train holds on the device too."""
    memory_gb = float(cfg.hardware.memory_gb)
    settings = Settings.from_cfg(cfg)
    if device.type != "cuda":  # the VAE and cache count against the cap; the trace sees only the step
        static = static_bytes(cfg, parameter_counts(cfg), settings)
        limit = usable_bytes(memory_gb, reserve_gib, fragmentation, static["vae"] + static["latent_cache"])
        return _run(cfg, settings, "cpu", limit)
    total = torch.cuda.get_device_properties(device).total_memory
    cap_gib = memory_gb - reserve_gib
    if cap_gib * GIB > total:
        return {"fits": None, "peak_gib": None, "note": f"profile needs a GPU of {memory_gb:g} GiB; this one has "
                                                        f"{total / GIB:.1f}"}
    torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / total, device)
    held = []
    try:
        held.append(build_vae(cfg).to(device).requires_grad_(False))
        extra = latent_cache_bytes(cfg)
        if extra:
            held.append(torch.empty(extra, dtype=torch.uint8, device=device))
        return _run(cfg, settings, "cuda", None)
    finally:
        held.clear()
        release(device)
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def _run(cfg, settings, method, limit) -> dict:
    try:
        return {"fits": True, "peak_gib": measure_step(cfg, settings, method, limit).peak / GIB, "note": ""}
    except torch.OutOfMemoryError as err:
        return {"fits": False, "peak_gib": None, "note": str(err).splitlines()[0][:160]}


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
            predicted = assess(pcfg, parameter_counts(pcfg), "cuda" if device.type == "cuda" else "fake", reserve,
                               frag, try_fixes=False)
            measured = capped_run(pcfg, device, reserve, frag)
            rows.append({"model": model, "profile": profile, "memory_gb": float(pcfg.hardware.memory_gb),
                         "predicted_fits": predicted.verdict["fits"], "predicted_need_gib": predicted.verdict["need_gib"],
                         "predicted_peak_gib": predicted.measured["peak_bytes"] / GIB,
                         "measured_fits": measured["fits"], "measured_peak_gib": measured["peak_gib"],
                         "agree": None if measured["fits"] is None else measured["fits"] == predicted.verdict["fits"],
                         "note": measured["note"]})
    return {"mode": "memory", "rows": None, "memory_rows": rows, "markdown": memory_markdown(rows)}


def memory_markdown(rows: list[dict]) -> str:
    def verdict(fits):
        return "n/a" if fits is None else ("fits" if fits else "does not fit")

    lines = ["### ldm-bench memory truth: ldm-diagnose's verdict vs a real capped run", "",
             "| model | profile | GiB | diagnose: need | diagnose | run: peak | run | agree |",
             "|---|---|---:|---:|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['profile']} | {r['memory_gb']:g} | {r['predicted_need_gib']:.2f} | "
                     f"{verdict(r['predicted_fits'])} | {fmt(r['measured_peak_gib'])} | {verdict(r['measured_fits'])} "
                     f"| {fmt(r['agree'])} |")
    return "\n".join(lines) + "\n"
