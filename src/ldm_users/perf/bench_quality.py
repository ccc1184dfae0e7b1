"""ldm-bench bench.mode=time_to_quality: which recipe reaches which quality after how many seconds of training.

Every recipe (ldm-train overrides) trains the LDM for the same budget of *training time* (train.max_train_seconds:
seconds inside optimizer steps, so grids, saves and exports do not count) and exports snapshots on the way
(train.snapshot_at_seconds). Each snapshot is then judged by ldm-eval. Both run as subprocesses, exactly the
commands a user would type, so a failing recipe is a row with its error and the others still run. The VAE is
trained once up front (vae_train.share caches it for every recipe with the same VAE settings) and timed apart.

Writes <results_dir>/time_to_quality_<name>.{md,json,png}: a row per recipe x snapshot (seconds, steps, images
seen, user top-1, FD and FD / real-FD), and top-1 and FD against training seconds, a line per recipe.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from ldm_users import io
from ldm_users.errors import ConfigError
from ldm_users.formatting import fmt
from ldm_users.layout import SNAPSHOT_FILE, SNAPSHOTS
from ldm_users.perf.bench_report import slug
from ldm_users.training.clock import snapshot_name

NEVER = 10**9  # an interval that never comes: no periodic grids during a timed run (and no step cap)
METRICS = ("user_acc/top1", "fd/classifier", "fd/classifier_real_holdout")


def _cli(app: str, *overrides: str) -> tuple[float, str | None]:
    """Run `ldm-<app> overrides` in a fresh process; (wall seconds, None or the error's last lines)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", f"ldm_users.cli.{app}", *overrides], capture_output=True, text=True)
    wall = time.perf_counter() - start
    return wall, None if out.returncode == 0 else error_of(out.stderr + out.stdout, out.returncode)


_NOISE = re.compile(r"^\[\d{4}-\d\d-\d\d|\d+%\||HYDRA_FULL_ERROR")  # log records, progress bars, Hydra's hint


def error_of(output: str, code: int) -> str:
    """What a failed command said, in a table cell: our own `error:` line, a traceback's last line, or the start
    of Hydra's message (an override it could not apply)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip() and not _NOISE.search(ln.strip())]
    own = [ln for ln in lines if ln.startswith("error:")]
    if own:
        picked = own[:1]
    elif any(ln.startswith("Traceback") for ln in lines):
        picked = lines[-1:]
    else:
        picked = lines[:3]
    return " / ".join(picked)[:300] or f"exit code {code}"


def settings(cfg: DictConfig) -> dict:
    ttq = cfg.bench.time_to_quality
    base = [str(o) for o in ttq.base]
    at = sorted(float(s) for s in ttq.eval_at_s)
    return {"name": str(ttq.get("name") or slug(" ".join(base)) or "default"), "base": base,
            "budget_s": float(ttq.budget_s), "eval_at_s": at, "eval": [str(o) for o in ttq.eval],
            "recipes": {str(k): [str(o) for o in v] for k, v in ttq.recipes.items()}}


def train_command(s: dict, recipe: str, run_dir: Path) -> list[str]:
    """The recipe's ldm-train overrides. The step cap comes first so that a recipe may set its own (then the run
    ends at whichever comes first); the time keys come last so that nothing overrides the budget. The snapshots are
    judged by ldm-eval afterwards, so the run itself evaluates nothing (a preset may set eval.enabled)."""
    seconds = ",".join(f"{t:g}" for t in s["eval_at_s"])
    return [f"train.max_steps={NEVER}", *s["base"], *s["recipes"][recipe], f"train.max_train_seconds={s['budget_s']:g}",
            f"train.snapshot_at_seconds=[{seconds}]", f"train.sample_interval={NEVER}", "eval.enabled=false", "logger=none",
            f"hydra.run.dir={run_dir}"]


def eval_command(s: dict, recipe: str, snapshot: Path, eval_dir: Path) -> list[str]:
    """ldm-eval's overrides for a snapshot. The sampler is part of a recipe (ldm-eval does not take it over from the
    trained run): the recipe's sampler overrides come after the shared eval ones."""
    sampler = [o for o in s["recipes"][recipe] if re.match(r"[+~]?sampler[./=]", o)]
    return [f"export_path={snapshot}", *s["eval"], *sampler, "logger=none", f"hydra.run.dir={eval_dir}"]


def evaluate_snapshot(s: dict, recipe: str, at: float, run_dir: Path) -> dict:
    """One row: where the clock was at the snapshot, and ldm-eval's scores of it."""
    snap = run_dir / SNAPSHOTS / snapshot_name(at)
    row = {"recipe": recipe, "at_s": at, "seconds": None, "steps": None, "images_seen": None,
           **{k: None for k in METRICS}, "fd_ratio": None, "error": None}
    if not (snap / SNAPSHOT_FILE).exists():
        row["error"] = f"no snapshot at {at:g} s (the run ended before, or failed)"
        return row
    record = json.loads((snap / SNAPSHOT_FILE).read_text())
    row.update(seconds=record["train_seconds"], steps=record["step"], images_seen=record["images_seen"])
    eval_dir = run_dir / "eval" / snapshot_name(at)
    _, error = _cli("eval", *eval_command(s, recipe, snap, eval_dir))
    if error:
        row["error"] = f"ldm-eval: {error}"
        return row
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    row.update({k: metrics.get(k) for k in METRICS})
    fd, real = row["fd/classifier"], row["fd/classifier_real_holdout"]
    row["fd_ratio"] = fd / real if fd is not None and real else None
    return row


def run_recipe(s: dict, recipe: str, out: Path) -> tuple[dict, list[dict]]:
    """Train one recipe, then evaluate its snapshots; (the training's summary, one row per snapshot)."""
    run_dir = out / recipe
    wall, error = _cli("train", *train_command(s, recipe, run_dir))
    trained = {"recipe": recipe, "run_dir": str(run_dir), "wall_s": wall, "error": error}
    print(f"time_to_quality: {recipe}: trained in {wall:.0f} s wall" + (f"; FAILED: {error}" if error else ""),
          flush=True)
    rows = []
    for at in s["eval_at_s"]:
        row = evaluate_snapshot(s, recipe, at, run_dir)
        if error and row["error"]:
            row["error"] = f"ldm-train: {error}"
        rows.append(row)
        print(f"time_to_quality: {recipe} @ {at:g} s: step {fmt(row['steps'])}, top-1 {fmt(row['user_acc/top1'], 3)}, "
              f"FD {fmt(row['fd/classifier'], 3)}" + (f" ({row['error']})" if row["error"] else ""), flush=True)
    return trained, rows


def run_time_to_quality(cfg: DictConfig, run_dir: Path) -> dict:
    s = settings(cfg)
    if not s["eval_at_s"] or s["eval_at_s"][-1] > s["budget_s"]:
        raise ConfigError(f"bench.time_to_quality.eval_at_s={s['eval_at_s']}: give at least one time, none past "
                          f"budget_s={s['budget_s']:g}.")
    out = Path(run_dir)
    # The shared VAE first: every recipe with the base's VAE settings reuses it, and its time is not a recipe's.
    vae_wall, vae_error = _cli("train", *s["base"], "stage=vae", "logger=none", f"hydra.run.dir={out / 'vae'}")
    print(f"time_to_quality: VAE: {vae_wall:.0f} s wall" + (f"; FAILED: {vae_error}" if vae_error else ""), flush=True)
    trained, rows = [], []
    for recipe in s["recipes"]:
        summary, recipe_rows = run_recipe(s, recipe, out)
        trained.append(summary)
        rows += recipe_rows
    return {"mode": "time_to_quality", "settings": s, "vae": {"wall_s": vae_wall, "error": vae_error},
            "recipes": trained, "rows": rows}


def to_markdown(result: dict, plot: Path | None) -> str:
    s = result["settings"]
    lines = [f"### ldm-bench time_to_quality: {s['name']}", "",
             f"base: `{' '.join(s['base']) or '(defaults)'}`; budget {s['budget_s']:g} s of LDM training time per "
             f"recipe (seconds inside optimizer steps); VAE (shared) {fmt(result['vae']['wall_s'], 3)} s wall. "
             f"FD: ldm-eval's classifier-feature FD; ratio: FD / FD of held-out real images.", ""]
    for recipe, overrides in s["recipes"].items():
        lines.append(f"- `{recipe}`: " + (f"`{' '.join(overrides)}`" if overrides else "the base only"))
    lines += ["", "| recipe | seconds | steps | images seen | user top-1 | FD | FD / real FD | error |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['recipe']} | {fmt(r['seconds'], 3)} | {fmt(r['steps'])} | {fmt(r['images_seen'])} | "
                     f"{fmt(r['user_acc/top1'], 3)} | {fmt(r['fd/classifier'], 3)} | {fmt(r['fd_ratio'], 3)} | "
                     f"{fmt(r['error'])} |")
    if plot is not None:
        lines += ["", f"![top-1 and FD against training seconds]({plot.name})"]
    return "\n".join(lines) + "\n"


def plot_curves(result: dict, path: Path) -> Path:
    """User top-1 and FD against training seconds, a line per recipe."""
    from matplotlib.figure import Figure  # a Figure saves to a file without pyplot or a display

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for recipe in result["settings"]["recipes"]:
        points = [r for r in result["rows"] if r["recipe"] == recipe and r["seconds"] is not None]
        for ax, key in zip(axes, ("user_acc/top1", "fd/classifier")):
            xy = [(r["seconds"], r[key]) for r in points if r[key] is not None]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=recipe)
    for ax, label in zip(axes, ("user top-1 (higher is better)", "FD, classifier features (lower is better)")):
        ax.set_xlabel("LDM training seconds")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"time to quality: {result['settings']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_quality_results(result: dict, results_dir: Path, run_dir: Path | None) -> list[Path]:
    """time_to_quality_<name>.{md,json,png} in results_dir (and the run dir)."""
    stem = f"time_to_quality_{result['settings']['name']}"
    results_dir.mkdir(parents=True, exist_ok=True)
    png = plot_curves(result, results_dir / f"{stem}.png")
    result["markdown"] = to_markdown(result, png)
    written = [io.write_text(results_dir / f"{stem}.md", result["markdown"]),
               io.write_json(results_dir / f"{stem}.json", {k: v for k, v in result.items() if k != "markdown"}), png]
    if run_dir is not None:  # the same files, rendered once (the markdown names the png by file name only)
        run_dir.mkdir(parents=True, exist_ok=True)
        for path in written:
            shutil.copyfile(path, run_dir / path.name)
    return written

