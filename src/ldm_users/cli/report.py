"""ldm-report: the jobs of a sweep side by side, for people without W&B access.

    ldm-report outputs/multirun/2026-01-01_12-00-00            # or: python -m ldm_users.cli.report DIR [DIR ...]

Reads each job dir under the given dirs (a job dir holds .hydra/, and what the trainer and ldm-eval write:
status.json, metrics.jsonl = what went to W&B, metrics.json = evaluation metrics) and writes to `<DIR>/report/`
(or -o): report.md and report.csv (one row per job: model, parameters, final loss, throughput, peak memory,
evaluation metrics and guidance scale when present), loss_curves.png and, when the jobs were evaluated,
eval.png (accuracy against FD, one point per job, labelled with its guidance scale).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from pathlib import Path

from omegaconf import OmegaConf

from ldm_users.errors import DataError, exit_on_user_error
from ldm_users.formatting import fmt
from ldm_users.sweep import STATUS_FILE
from ldm_users.tracking import METRICS_FILE, read_metrics

EVAL_FILE = "metrics.json"  # ldm-eval's, in the job dir; ldm-train eval.enabled=true writes it to <run>/eval/
# Evaluation metrics the markdown table shows (all numeric ones go to the CSV), when metrics.json has them.
HEADLINE_EVAL = [r"^user_acc/top1$", r"^user_acc/chance$", r"^fd/inception$", r"^fd/classifier$",
                 r"^kid/classifier$", r"^diversity/ratio$", r"^memorization/ratio$"]
# Per-user breakdowns stay in each job's metrics.json: a column per user and metric would bury the table.
_EVAL_SKIP = re.compile(r"^(per_user|confusion)/")
_JOB_MARKERS = (".hydra", METRICS_FILE, EVAL_FILE, STATUS_FILE)
# Columns every report has (CSV names); evaluation metrics follow them.
BASE_COLUMNS = ["job", "name", "status", "model", "hardware", "params_denoiser", "params_user_encoder", "params_vae",
                "steps", "final_loss", "images_per_sec", "peak_memory_gib"]


def is_job_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in _JOB_MARKERS)


def find_job_dirs(root: Path, depth: int = 3) -> list[Path]:
    """Job dirs at or under root (not inside a job dir: its vae/, ldm/, export/ are not jobs)."""
    root = Path(root)
    if is_job_dir(root):
        return [root]
    if depth == 0 or not root.is_dir():
        return []
    found: list[Path] = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith(".") and child.name != "report":
            found += find_job_dirs(child, depth - 1)
    return found


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}/" if isinstance(value, dict) else f"{prefix}{key}"))
    else:
        out[prefix.rstrip("/")] = tree
    return out


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if isinstance(value, float) and math.isnan(value) else value


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _hydra_config(job_dir: Path) -> dict:
    # Unresolved (it holds ${...}); only plain values such as model.name are read from it.
    path = job_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return {}
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:
        return {}


def _job_number(job_dir: Path, status: dict | None):
    if status and status.get("job") is not None:
        return int(status["job"])
    match = re.match(r"(\d+)_", job_dir.name)
    return int(match.group(1)) if match else None


def load_job(job_dir: Path) -> dict:
    """One job's row (plain values) plus its loss curves under "_curves": {stage: [(step, loss), ...]}."""
    job_dir = Path(job_dir)
    status = _load_json(job_dir / STATUS_FILE) or {}
    records = read_metrics(job_dir / METRICS_FILE) if (job_dir / METRICS_FILE).exists() else []
    starts = [r for r in records if r.get("event") == "start"]
    config = (starts[-1].get("config") if starts else None) or _hydra_config(job_dir)
    summary: dict = {}
    curves: dict[str, dict[int, float]] = {}
    last_logged: dict = {}
    peak_logged = None
    for record in records:
        if record.get("event") == "summary":
            summary.update(record.get("summary") or {})
        elif record.get("event") == "log" and record.get("step") is not None:
            metrics = record.get("metrics") or {}
            stage = record.get("stage") or "train"
            loss_key = next((k for k in metrics if k.endswith("/loss")), None)
            if loss_key is not None and _number(metrics[loss_key]) is not None:
                # A resumed run logs some steps again: the later value wins.
                curves.setdefault(stage, {})[int(record["step"])] = float(metrics[loss_key])
            if stage == "ldm":
                last_logged = metrics
                peak = _number(metrics.get("train/peak_memory_gib"))
                if peak is not None:
                    peak_logged = max(peak, peak_logged or 0.0)

    overrides = status.get("overrides")
    if overrides is None and (job_dir / ".hydra" / "overrides.yaml").exists():
        overrides = OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
    name = status.get("name") or (starts[-1].get("name") if starts else None) or ",".join(overrides or []) \
        or job_dir.name
    if status.get("status"):
        state = status["status"]
    elif any(r.get("event") == "finish" for r in records):
        state = "ok" if [r for r in records if r.get("event") == "finish"][-1].get("exit_code") == 0 else "failed"
    else:
        state = "unknown"

    def pick(*values):
        return next((v for v in (_number(x) for x in values) if v is not None), None)

    row = {
        "job": _job_number(job_dir, status), "name": name, "status": state,
        "model": (config.get("model") or {}).get("name"), "hardware": (config.get("hardware") or {}).get("name"),
        "params_denoiser": pick(summary.get("params/denoiser")),
        "params_user_encoder": pick(summary.get("params/user_encoder")),
        "params_vae": pick(summary.get("params/vae")),
        "steps": max(curves["ldm"]) if curves.get("ldm") else None,
        "final_loss": pick(summary.get("final/loss"), last_logged.get("train/loss")),
        "images_per_sec": pick(summary.get("final/images_per_sec"), last_logged.get("train/images_per_sec")),
        "peak_memory_gib": pick(summary.get("final/peak_memory_gib"), peak_logged),
        "error": status.get("error"), "job_dir": str(job_dir),
        "_overrides": list(overrides or []),
        "_curves": {stage: sorted(points.items()) for stage, points in curves.items()},
        "_eval": {},
    }
    evaluation = _load_json(job_dir / EVAL_FILE) or _load_json(job_dir / "eval" / EVAL_FILE)
    if isinstance(evaluation, dict):
        flat = _flatten(evaluation)
        row["_eval"] = {k: v for k, v in flat.items() if _number(v) is not None and not k.endswith("guidance_scale")
                        and not _EVAL_SKIP.match(k)}
        scale = next((flat[k] for k in flat if k.endswith("guidance_scale") and _number(flat[k]) is not None), None)
        if scale is None:  # not in the metrics: the config the evaluation ran with says it
            scale = _number((config.get("sampler") or {}).get("guidance_scale"))
        row["guidance_scale"] = scale
    return row


def _metric_key(keys, *patterns: str):
    for pattern in patterns:
        for key in keys:
            if re.search(pattern, key, flags=re.IGNORECASE):
                return key
    return None


def accuracy_key(keys):
    return _metric_key(keys, r"^user_acc/top1$", r"acc[^/]*/top1$", r"(^|/|_)accuracy$", r"accuracy",
                       r"(^|/|_)acc$")


def fd_key(keys):
    # Standard FID when it was computed (eval.inception_weights), else the classifier-feature FD.
    return _metric_key(keys, r"^fd/inception$", r"^fd/classifier$", r"(^|/|_)(fd|fid)$", r"(^|/|_)(fd|fid)(/|_)")


def _varying(rows: list[dict]) -> tuple[list[str], dict[int, str]]:
    """Overrides shared by every job, and for each row the ones that tell it apart (short labels)."""
    sets = [set(r["_overrides"]) for r in rows]
    common = set.intersection(*sets) if sets and all(sets) else set()
    labels = {}
    for i, row in enumerate(rows):
        rest = [o for o in row["_overrides"] if o not in common]
        labels[i] = ",".join(rest) if rest else (row["name"] if not common else "(common overrides only)")
    return sorted(common), labels


def write_tables(rows: list[dict], out_dir: Path, plots: list[Path] | None = None) -> tuple[Path, Path, list[str]]:
    eval_columns = sorted({k for r in rows for k in r["_eval"]})
    has_scale = any("guidance_scale" in r for r in rows)
    columns = BASE_COLUMNS + (["guidance_scale"] if has_scale else []) + eval_columns + ["error", "job_dir"]
    csv_path = out_dir / "report.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row["_eval"].get(c) if c in eval_columns else row.get(c) for c in columns})

    common, labels = _varying(rows)
    headline = [c for c in eval_columns if any(re.search(p, c) for p in HEADLINE_EVAL)] or eval_columns
    shown = ["job", "label", "status", "model", "hardware", "params_denoiser", "steps", "final_loss",
             "images_per_sec", "peak_memory_gib"] + (["guidance_scale"] if has_scale else []) + headline
    # An eval-only sweep has no training numbers (and vice versa): leave out columns empty in every row.
    shown = [c for c in shown if c in ("job", "label")
             or any({**r, **r["_eval"]}.get(c) not in (None, "unknown") for r in rows)]
    headers = {"label": "overrides", "params_denoiser": "denoiser params", "final_loss": "final loss",
               "images_per_sec": "images/s", "peak_memory_gib": "peak GPU mem (GiB)"}
    lines = ["# Sweep report", ""]
    if common:
        lines += [f"Common overrides: `{' '.join(common)}`", ""]
    lines += ["| " + " | ".join(headers.get(c, c) for c in shown) + " |", "|" + "---|" * len(shown)]
    for i, row in enumerate(rows):
        values = {**row, **row["_eval"], "label": labels[i]}
        lines.append("| " + " | ".join(fmt(values.get(c)) for c in shown) + " |")
    failed = [r for r in rows if r["status"] not in ("ok", "unknown")]
    if failed:
        lines += ["", "Failed jobs:", ""] + [f"- job {r['job']} (`{r['name']}`): {r['error']}" for r in failed]
    if len(headline) < len(eval_columns):
        lines += ["", f"All {len(eval_columns)} evaluation metrics per job: `report.csv`; per-user ones: each "
                      f"job's {EVAL_FILE}."]
    if "peak_memory_gib" in shown:
        lines += ["", "Peak GPU memory is '-' for jobs that ran on the CPU."]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"![{p.stem}]({p.name})" for p in plots)]
    lines += ["", "Job dirs:", ""] + [f"- {r['job']}: `{r['job_dir']}`" for r in rows]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path, lines


def plot_losses(rows: list[dict], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    stages = [s for s in ("vae", "ldm") if any(s in r["_curves"] for r in rows)]
    stages += sorted({s for r in rows for s in r["_curves"]} - set(stages))
    if not stages:
        return None
    _, labels = _varying(rows)
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for i, row in enumerate(rows):
            points = row["_curves"].get(stage)
            if points:
                steps, losses = zip(*points)
                ax.plot(steps, losses, marker="o" if len(points) < 20 else None, markersize=3,
                        label=f"{row['job']}: {labels[i]}")
        ax.set_title(f"{stage} training loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        values = [v for r in rows for _, v in r["_curves"].get(stage, [])]
        if min(values) > 0 and max(values) / min(values) > 10:  # long runs: a log axis shows the late part
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_eval(rows: list[dict], path: Path) -> Path | None:
    keys = sorted({k for r in rows for k in r["_eval"]})
    acc, fd = accuracy_key(keys), fd_key(keys)
    points = [r for r in rows if acc and fd and _number(r["_eval"].get(acc)) is not None
              and _number(r["_eval"].get(fd)) is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    scaled = sorted((r for r in points if _number(r.get("guidance_scale")) is not None),
                    key=lambda r: r["guidance_scale"])
    if len(scaled) > 1:  # the trade-off as the guidance scale grows
        ax.plot([r["_eval"][fd] for r in scaled], [r["_eval"][acc] for r in scaled], color="0.6", zorder=1)
    for row in points:
        x, y = row["_eval"][fd], row["_eval"][acc]
        ax.scatter([x], [y], zorder=2)
        scale = _number(row.get("guidance_scale"))
        label = f"w={scale:g}" if scale is not None else f"job {row['job']}"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(f"{fd} (lower is better)")
    ax.set_ylabel(f"{acc} (higher is better)")
    ax.set_title("user accuracy against FD")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _order(row: dict) -> tuple:
    return (row["job"] is None, row["job"] or 0, row["job_dir"])


def make_report(dirs: list[Path], out_dir: Path | None = None) -> dict:
    dirs = [Path(d) for d in dirs]
    for d in dirs:
        if not d.is_dir():
            raise DataError(f"{d} is not a directory: pass a multirun dir (e.g. outputs/multirun/<date>) or run dirs.")
    job_dirs = [(i, j) for i, d in enumerate(dirs) for j in find_job_dirs(d)]
    if not job_dirs:
        raise DataError(f"no job dirs under {', '.join(map(str, dirs))} (a job dir holds .hydra/, {METRICS_FILE} "
                        f"or {EVAL_FILE}): pass the sweep dir `ldm-train -m` printed, e.g. outputs/multirun/<date>.")
    # In the order of the dirs given, then by Hydra job number.
    keyed = [((i, *_order(row)), row) for i, row in ((i, load_job(j)) for i, j in job_dirs)]
    rows = [row for _, row in sorted(keyed, key=lambda item: item[0])]
    out_dir = Path(out_dir) if out_dir else dirs[0] / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_losses(rows, out_dir / "loss_curves.png")
    eval_plot = plot_eval(rows, out_dir / "eval.png")
    md_path, csv_path, lines = write_tables(rows, out_dir, [p for p in (plot, eval_plot) if p])
    return {"markdown": md_path, "csv": csv_path, "loss_plot": plot, "eval_plot": eval_plot, "rows": rows,
            "lines": lines}


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ldm-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="multirun dir(s) (or single run dirs) to compare")
    parser.add_argument("-o", "--out", type=Path, default=None, help="output folder (default: <first dir>/report)")
    args = parser.parse_args(argv)
    result = make_report(args.dirs, args.out)
    print("\n".join(result["lines"]))
    print(f"\nldm-report: wrote {result['markdown']}, {result['csv']}"
          + (f", {result['loss_plot']}" if result["loss_plot"] else "")
          + (f", {result['eval_plot']}" if result["eval_plot"] else ""))


if __name__ == "__main__":
    main()
