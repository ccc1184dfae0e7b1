"""report.md (the headline columns, for reading) and report.csv (every column and metric, for tools)."""

from __future__ import annotations

import csv
from pathlib import Path

from ldm_users.formatting import fmt
from ldm_users.reporting.jobs import BASE_COLUMNS, EVAL_FILE, JobRow

# ldm-eval's metrics the markdown table shows (all numeric ones go to the CSV), when the jobs have them.
# The generated FD stands beside the autoencoder's ceiling and the real floor (evaluation/diagnosis.py), with the
# stage that limits quality and whether the judge can tell.
HEADLINE_EVAL = ["user_acc/top1", "user_acc/chance", "fd/inception", "fd/classifier", "ceiling/fd_classifier",
                 "fd/classifier_real_holdout", "bottleneck/stage", "judge/reliable", "kid/classifier",
                 "diversity/ratio", "memorization/ratio"]
SHOWN_COLUMNS = ["job", "label", "status", "model", "hardware", "params_denoiser", "steps", "final_loss",
                 "images_per_sec", "peak_memory_gib", "vae_recon_psnr", "vae_recon_fd"]
HEADERS = {"label": "overrides", "params_denoiser": "denoiser params", "final_loss": "final loss",
           "images_per_sec": "images/s", "peak_memory_gib": "peak GPU mem (GiB)",
           "ceiling/fd_classifier": "ceiling FD (VAE)", "fd/classifier_real_holdout": "real FD (floor)",
           "bottleneck/stage": "bottleneck", "judge/reliable": "judge reliable",
           "vae_recon_psnr": "VAE recon PSNR (dB)", "vae_recon_fd": "VAE recon FD"}


def varying(rows: list[JobRow]) -> tuple[list[str], list[str]]:
    """Overrides shared by every job, and for each row the ones that tell it apart (short labels)."""
    sets = [set(r.overrides) for r in rows]
    common = set.intersection(*sets) if sets and all(sets) else set()
    labels = []
    for row in rows:
        rest = [o for o in row.overrides if o not in common]
        labels.append(",".join(rest) if rest else (row.columns["name"] if not common else "(common overrides only)"))
    return sorted(common), labels


def write_csv(rows: list[JobRow], path: Path, eval_columns: list[str]) -> Path:
    has_scale = any("guidance_scale" in r.columns for r in rows)
    columns = BASE_COLUMNS + (["guidance_scale"] if has_scale else []) + eval_columns + ["error", "job_dir"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.value(c) for c in columns})
    return path


def _weak_judge_lines(rows: list[JobRow], labels: list[str]) -> list[str]:
    """A note under the table when ldm-eval found its judge weak for some jobs: their accuracy and FD mean little."""
    weak = [(row, label) for row, label in zip(rows, labels) if row.evaluation.get("judge/reliable") is False]
    if not weak:
        return []
    named = ", ".join(f"{fmt(row.columns.get('job'))} ({label}: held-out top-1 "
                      f"{fmt(row.evaluation.get('classifier/holdout_top1'), 3)})" for row, label in weak)
    advice = next((row.evaluation["judge/advice"] for row, _ in weak if row.evaluation.get("judge/advice")), None)
    return ["", f"Weak judge for job(s) {named}: their accuracy and FD figures mean little."
                + (f" What would make them meaningful: {advice}." if advice else "")]


def markdown_lines(rows: list[JobRow], eval_columns: list[str], plots: list[Path]) -> list[str]:
    common, labels = varying(rows)
    headline = [c for c in HEADLINE_EVAL if c in eval_columns] or eval_columns
    has_scale = any("guidance_scale" in r.columns for r in rows)
    shown = SHOWN_COLUMNS + (["guidance_scale"] if has_scale else []) + headline
    # An eval-only sweep has no training numbers (and vice versa): leave out columns empty in every row.
    shown = [c for c in shown if c in ("job", "label") or any(r.value(c) not in (None, "unknown") for r in rows)]
    lines = ["# Sweep report", ""]
    if common:
        lines += [f"Common overrides: `{' '.join(common)}`", ""]
    lines += ["| " + " | ".join(HEADERS.get(c, c) for c in shown) + " |", "|" + "---|" * len(shown)]
    for row, label in zip(rows, labels):
        lines.append("| " + " | ".join(fmt(label if c == "label" else row.value(c)) for c in shown) + " |")
    lines += _weak_judge_lines(rows, labels)
    failed = [r.columns for r in rows if r.columns["status"] not in ("ok", "unknown")]
    if failed:
        lines += ["", "Failed jobs:", ""] + [f"- job {r['job']} (`{r['name']}`): {r['error']}" for r in failed]
    if len(headline) < len(eval_columns):
        lines += ["", f"All {len(eval_columns)} evaluation metrics per job: `report.csv`; per-user ones: each "
                      f"job's {EVAL_FILE}."]
    if "peak_memory_gib" in shown:
        lines += ["", "Peak GPU memory is '-' for jobs that ran on the CPU."]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"![{p.stem}]({p.name})" for p in plots)]
    lines += ["", "Job dirs:", ""] + [f"- {r.columns['job']}: `{r.columns['job_dir']}`" for r in rows]
    return lines


def write_tables(rows: list[JobRow], out_dir: Path, plots: list[Path]) -> tuple[Path, Path, list[str]]:
    eval_columns = sorted({k for r in rows for k in r.evaluation})
    csv_path = write_csv(rows, out_dir / "report.csv", eval_columns)
    lines = markdown_lines(rows, eval_columns, plots)
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path, lines
