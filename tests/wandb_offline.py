"""Read an offline W&B run back without a server, with wandb's own reader (`wandb leet inspect`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WANDB = str(Path(sys.executable).with_name("wandb"))


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob("wandb/offline-run-*"))


def inspect_summary(wandb_run_dir: Path) -> dict:
    """State, exit code, name, tags, config and summary of one run."""
    out = subprocess.run([WANDB, "leet", "inspect", "--summary", "--json", str(wandb_run_dir)],
                         capture_output=True, text=True, timeout=180, check=True).stdout
    return json.loads(out)


def inspect_records(wandb_run_dir: Path) -> list[dict]:
    """Every record of the run's .wandb log (run, history, summary, files, artifact, exit, ...)."""
    out = subprocess.run([WANDB, "leet", "inspect", "--json", str(wandb_run_dir)],
                         capture_output=True, text=True, timeout=180, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def run_record(records: list[dict]) -> dict:
    return next(r["run"] for r in records if r["type"] == "run")


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]
