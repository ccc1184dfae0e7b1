"""ldm-bench's results: the ours-vs-reference rows, the markdown table, the files under bench.results_dir, the
tracker, and the description of the machine they were measured on."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import diffusers
import torch
from omegaconf import DictConfig

from ldm_users import io
from ldm_users.formatting import fmt as format_value
from ldm_users.tracking import make_tracker


def device_of() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor()}".strip()


def env_info(device: torch.device) -> dict:
    return {"device": device_name(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


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


def fmt(value) -> str:
    return format_value(value, digits=3, missing="n/a")


def to_markdown(result: dict) -> str:
    env = result["env"]
    head = (f"### ldm-bench: model={result['model']} ({result['params']['denoiser'] / 1e6:.1f}M) "
            f"hardware={result['hardware']} on {env['device']}")
    about = (f"torch {env['torch']}, diffusers {env['diffusers']}. Compared: {result['compared']}. "
             f"reference: {result['reference_desc']}. ours: {result['ours_desc']}.")
    lines = [head, "", about, "", "| metric | reference | ours | ours/reference |", "|---|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['metric']} | {fmt(row['reference'])} | {fmt(row['ours'])} | "
                     f"{fmt(row['ours/reference'])} |")
    return "\n".join(lines) + "\n"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_results(result: dict, results_dir: Path, run_dir: Path | None, stem: str) -> tuple[Path, Path]:
    """<stem>.md and .json in results_dir (and the run dir), and bench_summary.md over every page there."""
    md, js = results_dir / f"{stem}.md", results_dir / f"{stem}.json"
    text = result["markdown"] = to_markdown(result) if result.get("rows") else result["markdown"]
    for folder in [results_dir] + ([run_dir] if run_dir is not None else []):
        io.write_text(folder / md.name, text)
        io.write_json(folder / js.name, result)
    # One page with every run in the folder (a sweep writes one file per job).
    pages = [p for p in sorted(results_dir.glob("bench*.md")) if p.name != "bench_summary.md"]
    io.write_text(results_dir / "bench_summary.md", "\n".join(p.read_text() for p in pages))
    return md, js


def log_to_tracker(cfg: DictConfig, result: dict, run_dir: Path | None) -> None:
    """Every table value as a flat metric (bench/<metric>/<column>, memory/<model>/<profile>/agree)."""
    # Outside a Hydra app there is no run dir: track next to the results, never into the current directory.
    tracker = make_tracker(cfg, run_dir or Path(str(cfg.bench.results_dir)), "bench", True)
    try:
        metrics = {}
        for row in result.get("rows") or []:
            key = slug(row["metric"]).replace("-", "_")
            for col in ("reference", "ours", "ours/reference"):
                if isinstance(row[col], (int, float)):
                    metrics[f"bench/{key}/{col.replace('/', '_over_')}"] = row[col]
        for row in result.get("memory_rows") or []:
            metrics[f"memory/{row['model']}/{row['profile']}/agree"] = row["agree"]
        tracker.log(metrics)
        tracker.set_summary(metrics)
    finally:
        tracker.finish(0)
