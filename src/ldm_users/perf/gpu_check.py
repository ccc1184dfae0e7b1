"""Every check that needs a GPU, in one go (experiments/gpu_check.sh): run on one H100-class GPU in under 8 minutes,
it writes experiments/results/gpu_check_<device>.{md,json} with the device, the library versions and each check's
figures, command and status.

The checks, each a subprocess with its own time limit (the limits add up to the 8 minutes, so a check that runs
long is a row saying so, and the others still run):
- ldm-bench speed under hardware=h100_80gb for unet_light, dit, flux, unet_medium, unet_sd (ours vs the
  diffusers-example loop, eager vs compiled; sampling eager vs CUDA graph: batch-1 latency, batch-256 throughput);
- ldm-bench bench.mode=memory: each model's real step under each profile's memory cap, against ldm-diagnose;
- 50 steps of p100_16gb's fp16 + GradScaler (skipped steps and the final loss scale, from the checkpoint);
- a short experiment=small_data_16gb run (both stages at 128 px, then the export).

`--dry-run` composes every command's config as its app would (and its run-time checks: the compatibility check
for ldm-train) without running anything: seconds on a CPU, so a test keeps the commands from rotting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SPEED_MODELS = ["unet_light", "dit", "flux", "unet_medium", "unet_sd"]  # cheapest first: a late timeout costs least
MEMORY_MODELS = "[unet_light,unet_medium,unet_sd,dit,flux]"
BUDGET_S = 480
APP_CONFIG = {"ldm-bench": "bench", "ldm-train": "config", "ldm-diagnose": "diagnose"}


@dataclass
class Check:
    name: str
    app: str                 # the console script
    overrides: list[str]
    timeout_s: int
    what: str
    run_dir: Path | None = None
    result: dict = field(default_factory=dict)

    def command(self, python_bin: Path) -> list[str]:
        return [str(python_bin / self.app), *self.overrides]


def checks(work: Path) -> list[Check]:
    bench = ["hardware=h100_80gb", "logger=none", f"bench.results_dir={work / 'bench'}", "bench.warmup_steps=3",
             "bench.steps=10", "bench.sample.repeats=1", "bench.sample.batch1_repeats=2"]
    out = []
    limits = {"unet_light": 40, "dit": 40, "flux": 45, "unet_medium": 50, "unet_sd": 80}
    for model in SPEED_MODELS:
        extra = ["bench.batch_size=64", "bench.sample.batch_size=64"] if model == "unet_sd" else []
        out.append(Check(f"speed_{model}", "ldm-bench", [f"model={model}", *bench, *extra,
                                                         f"hydra.run.dir={work / 'runs' / f'bench_{model}'}"],
                         limits[model], f"ldm-bench speed, model={model} hardware=h100_80gb"))
    out.append(Check("memory", "ldm-bench", ["bench.mode=memory", "logger=none", f"bench.memory.models={MEMORY_MODELS}",
                                            f"bench.results_dir={work / 'bench'}",
                                            f"hydra.run.dir={work / 'runs' / 'bench_memory'}"],
                     75, "ldm-bench bench.mode=memory against ldm-diagnose's verdicts"))
    fp16 = work / "runs" / "p100_fp16"
    out.append(Check("p100_fp16", "ldm-train", ["experiment=smoke", "hardware=p100_16gb", "model=unet_light",
                                                "train.max_steps=50", "train.save_interval=50", "train.log_interval=10",
                                                "logger=none", f"hydra.run.dir={fp16}"],
                     60, "50 LDM steps of p100_16gb: fp16 autocast + GradScaler (after a 30-step VAE)", fp16))
    small = work / "runs" / "small_data_16gb"
    out.append(Check("small_data_16gb", "ldm-train", ["experiment=small_data_16gb", "data.num_users=8",
                                                      "data.images_per_user=16", "vae_train.max_steps=200",
                                                      "vae_train.scale_samples=64", "train.max_steps=300",
                                                      "train.save_interval=300", "train.sample_interval=100000",
                                                      "train.log_interval=50", "eval.enabled=false", "logger=none",
                                                      f"hydra.run.dir={small}"],
                     70, "experiment=small_data_16gb, 200 VAE + 300 LDM steps on 8 synthetic users at 128 px", small))
    assert sum(c.timeout_s for c in out) <= BUDGET_S
    return out


def compose_check(check: Check) -> None:
    """Compose the command's config as its app would; an error raises (a ConfigError, a Hydra error)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from ldm_users.config import compose

    cfg = compose(check.overrides, APP_CONFIG[check.app], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in the run dir names
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # the job's config, as the app gets it
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every interpolation resolves
    if check.app == "ldm-train":
        from ldm_users.compat import assert_compatible

        assert_compatible(cfg)
    if check.app == "ldm-bench":
        mode = str(cfg.bench.mode)
        if mode == "memory":
            for model in cfg.bench.memory.models:  # each is composed later inside the run: check they exist
                compose([f"model={model}"], "config")


def run_check(check: Check, python_bin: Path) -> None:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(check.command(python_bin), capture_output=True, text=True, timeout=check.timeout_s)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        tail = (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired as err:
        status = f"timed out after {check.timeout_s} s"
        tail = ((err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace"))[-1500:]
    check.result = {"status": status, "seconds": round(time.perf_counter() - t0, 1),
                    "log_tail": tail if status != "ok" else ""}


def figures(check: Check, work: Path) -> dict:
    """The numbers a person wants from each check, read from the files it wrote."""
    bench = work / "bench"
    if check.name.startswith("speed_"):
        model = check.name.removeprefix("speed_")
        found = sorted(bench.glob(f"bench_{model}_h100_80gb_*.json"))
        if not found:
            return {}
        result = json.loads(found[-1].read_text())
        return {"rows": result.get("rows"), "markdown": result.get("markdown")}
    if check.name == "memory":
        found = sorted(bench.glob("bench-memory_*.json"))
        if not found:
            return {}
        rows = json.loads(found[-1].read_text()).get("memory_rows") or []
        return {"memory_rows": rows, "disagreements": [r for r in rows if r.get("agree") is False]}
    if check.run_dir is not None:
        return train_figures(check.run_dir)
    return {}


def train_figures(run_dir: Path) -> dict:
    import torch

    out = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip().startswith("{")]
        losses = [r["ldm/loss"] for r in records if "ldm/loss" in r]
        skipped = [r["ldm/skipped_steps"] for r in records if "ldm/skipped_steps" in r]
        out.update(ldm_loss_first=losses[0] if losses else None, ldm_loss_last=losses[-1] if losses else None,
                   ldm_skipped_steps=sum(skipped) if skipped else 0)
    scalers = sorted((run_dir / "ldm" / "checkpoints").glob("checkpoint-*/scaler.pt"))
    if scalers:
        out["grad_scaler"] = {k: v for k, v in torch.load(scalers[-1], weights_only=True).items()
                              if k in ("scale", "_growth_tracker")}
    out["export"] = (run_dir / "export" / "model_index.json").exists()
    return out


def env() -> dict:
    from ldm_users.perf.bench_report import device_of, env_info

    import accelerate

    info = env_info(device_of())
    info["accelerate"] = accelerate.__version__
    return info


def to_markdown(report: dict) -> str:
    e = report["env"]
    lines = [f"# GPU check on {e['device']}", "",
             f"torch {e['torch']} (CUDA {e['cuda']}), diffusers {e['diffusers']}, accelerate {e['accelerate']}, "
             f"Python {e['python']}; {report['seconds']:.0f} s in all (limit {BUDGET_S} s).", "",
             "| check | what | status | seconds |", "|---|---|---|---:|"]
    for c in report["checks"]:
        lines.append(f"| {c['name']} | {c['what']} | {c['status']} | {c['seconds']} |")
    for c in report["checks"]:
        lines += ["", f"## {c['name']}", "", f"`{c['command']}`", ""]
        f = c.get("figures") or {}
        if f.get("markdown"):
            lines.append(f["markdown"])
        elif "memory_rows" in f:
            lines.append(f"{len(f['memory_rows'])} model x profile runs; disagreements with ldm-diagnose: "
                         f"{[(r['model'], r['profile']) for r in f['disagreements']] or 'none'}")
        elif f:
            lines.append(", ".join(f"{k}: {v}" for k, v in f.items()))
        if c.get("log_tail"):
            lines += ["", "```", c["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN") == "1",
                        help="compose every command's config without running it (DRY_RUN=1 too)")
    parser.add_argument("--results-dir", default="experiments/results")
    parser.add_argument("--work-dir", default="outputs/gpu_check")
    args = parser.parse_args(argv)
    python_bin = Path(sys.executable).parent
    work = Path(args.work_dir).absolute()
    todo = checks(work)
    missing = [c.app for c in todo if not (python_bin / c.app).exists() and not shutil.which(c.app)]
    if missing:
        print(f"error: {', '.join(sorted(set(missing)))} not installed next to {sys.executable}: run `make install`.")
        return 1
    if args.dry_run:
        for c in todo:
            compose_check(c)
            print(f"composes ({c.timeout_s:>3} s limit): {' '.join(c.command(python_bin))}")
        print(f"gpu_check: dry run, {len(todo)} commands compose; limits add up to "
              f"{sum(c.timeout_s for c in todo)} of {BUDGET_S} s.")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: experiments/gpu_check.sh needs a CUDA GPU (this machine has none); --dry-run checks the "
              "commands without one.")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    for c in todo:
        print(f"gpu_check: {c.name} (limit {c.timeout_s} s) ...", flush=True)
        run_check(c, python_bin)
        print(f"gpu_check: {c.name}: {c.result['status']} in {c.result['seconds']} s", flush=True)
    report = {"env": env(), "seconds": time.perf_counter() - t0, "budget_s": BUDGET_S,
              "checks": [{"name": c.name, "what": c.what, "command": " ".join(c.command(python_bin)),
                          **c.result, "figures": figures(c, work)} for c in todo]}
    from ldm_users import io
    from ldm_users.perf.bench_report import slug

    results = Path(args.results_dir)
    stem = f"gpu_check_{slug(report['env']['device'])}"
    io.write_text(results / f"{stem}.md", to_markdown(report))
    io.write_json(results / f"{stem}.json", report)
    print(f"gpu_check: wrote {results / stem}.md and .json")
    return 0 if all(c.result["status"] == "ok" for c in todo) else 1


if __name__ == "__main__":
    sys.exit(main())
