"""ldm-diagnose: parameter counts, training memory and a fits / does-not-fit verdict per hardware profile.

    ldm-diagnose model=unet_medium                 # every profile in conf/hardware
    ldm-diagnose model=unet_sd hardware=gpu_8gb    # only that profile

Prints the compatibility check, a markdown report, and writes diagnose.json to the run dir. Exits 1 when the
configuration is inconsistent or does not fit its hardware profile (scripts and CI can rely on it).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from ldm_users.compat import check_compatibility
from ldm_users.config import config_dir
from ldm_users.errors import ConfigError, exit_on_user_error
from ldm_users.perf.configs import resolve_list, with_group
from ldm_users.runtime import output_dir, task_overrides
from ldm_users.perf.memory_model import GIB, ProfileReport, assess, parameter_counts, require_num_users

log = logging.getLogger("ldm_users.cli.diagnose")


def choose_method(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "fake"
    if requested not in ("cuda", "fake", "cpu"):
        raise ConfigError(f"diagnose.measure={requested}: use auto, cuda, fake or cpu.")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("diagnose.measure=cuda but there is no CUDA GPU: use diagnose.measure=fake.")
    return requested


def _assess_profile(cfg: DictConfig, counts: dict, method: str, dcfg) -> ProfileReport:
    args = (float(dcfg.reserve_gib), float(dcfg.fragmentation), bool(dcfg.suggest))
    if method != "cuda":
        return assess(cfg, counts, method, *args)
    try:
        return assess(cfg, counts, "cuda", *args)
    except torch.OutOfMemoryError:  # the profile is bigger than this GPU: trace it instead
        torch.cuda.empty_cache()
        log.info("hardware=%s exceeds this GPU: tracing on fake tensors instead", cfg.hardware.name)
        return assess(cfg, counts, "fake", *args)


def chosen_profiles(dcfg, current: str):
    """diagnose.profiles=auto: the profile named on the command line (`hardware=X`), else every profile."""
    if str(dcfg.profiles) != "auto":
        return dcfg.profiles
    return "current" if any(o.split("=", 1)[0] == "hardware" for o in task_overrides()) else "all"


def diagnose(cfg: DictConfig) -> dict:
    """The whole report as a dict (the JSON); also what the tests call."""
    require_num_users(cfg)
    problems = check_compatibility(cfg)
    counts = parameter_counts(cfg) if not problems else {}
    dcfg = cfg.diagnose
    method = choose_method(str(dcfg.measure))
    profiles = []
    if not problems:
        for name in resolve_list(chosen_profiles(dcfg, str(cfg.hardware.name)), "hardware", str(cfg.hardware.name)):
            # The current profile keeps the command line's hardware.* overrides; the others are as shipped.
            pcfg = cfg if name == cfg.hardware.name else with_group(cfg, "hardware", name)
            profiles.append(asdict(_assess_profile(pcfg, counts, method, dcfg)))
    return {"model": str(cfg.model.name), "vae": str(cfg.vae.name), "hardware": str(cfg.hardware.name),
            "resolution": int(cfg.data.resolution),
            "num_users": int(cfg.data.num_users), "compatibility_problems": problems, "parameters": counts,
            "reserve_gib": float(dcfg.reserve_gib), "fragmentation": float(dcfg.fragmentation), "profiles": profiles}


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def to_markdown(report: dict) -> str:
    title = (f"# ldm-diagnose: model={report['model']} vae={report['vae']} resolution={report['resolution']} "
             f"users={report['num_users']}")
    lines = [title, ""]
    if report["compatibility_problems"]:
        lines += ["Compatibility problems (fix these first):", *[f"- {p}" for p in report["compatibility_problems"]]]
        return "\n".join(lines) + "\n"
    p = report["parameters"]
    lines += ["| component | parameters |", "|---|---:|"]
    for key in ("vae", "denoiser", "user_encoder"):
        lines.append(f"| {key} | {p[key]:,} ({p[key] / 1e6:.1f}M) |")
    legend = ("Memory in GiB. weights/gradients/optimizer/EMA: exact (fp32 master weights, fp32 grads, AdamW "
              "exp_avg+exp_avg_sq). activations: growth over one forward; peak: the worst moment of a "
              f"steady-state step, measured. need = (peak + VAE + latent cache) x {1 + report['fragmentation']:g} "
              f"+ {report['reserve_gib']:g} GiB reserve (CUDA context, workspaces).")
    header = ("| profile | GiB | precision | batch x accum | ckpt | weights | grads | AdamW | EMA | VAE+cache | "
              "activations | peak | need | verdict | to make it fit | measured |")
    lines += ["", legend, "", header,
              "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in report["profiles"]:
        s, st, m, v = r["settings"], r["static"], r["measured"], r["verdict"]
        fix = " ".join(f"`{o}`" for o in r["fix"]) + (f" ({r['fix_note']})" if r["fix_note"] else "")
        lines.append(
            f"| {r['profile']} | {v['budget_gib']:g} | {s['precision']} | {s['batch']} x {s['accum']} | "
            f"{'on' if s['gradient_checkpointing'] else 'off'} | {_gib(st['weights'])} | {_gib(st['gradients'])} | "
            f"{_gib(st['optimizer'])} | {_gib(st['ema'])} | {_gib(st['vae'] + st['latent_cache'])} | "
            f"{_gib(m['activation_bytes'])} | {_gib(m['peak_bytes'])} | {v['need_gib']:.2f} | **{v['label']}** | "
            f"{fix or '-'} | {m['method']} |")
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig) -> dict:
    report = diagnose(cfg)
    for problem in report["compatibility_problems"]:
        print(f"compatibility: {problem}")
    print(to_markdown(report))
    out = output_dir(default="outputs/diagnose/default")
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(report, indent=1))
    (out / "diagnose.md").write_text(to_markdown(report))
    print(f"ldm-diagnose: wrote {out / 'diagnose.json'}")
    return report


def exit_code(report: dict) -> int:
    """1 when the configuration is inconsistent or does not fit its own profile (hardware=...), else 0."""
    if report["compatibility_problems"]:
        return 1
    own = [p for p in report["profiles"] if p["profile"] == report["hardware"]]
    return 1 if own and not own[0]["verdict"]["fits"] else 0


@hydra.main(config_path=config_dir(), config_name="diagnose", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    report = run(cfg)
    if exit_code(report):
        why = ("the configuration is not consistent" if report["compatibility_problems"] else
               f"model={report['model']} does not fit hardware={report['hardware']}")
        print(f"ldm-diagnose: {why} (exit 1).")
        sys.exit(1)


if __name__ == "__main__":
    main()
