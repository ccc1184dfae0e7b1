"""One job dir -> one `JobRow`: what the trainer (metrics.jsonl, status.json) and ldm-eval (metrics.json) wrote.

The metric names are the ones this project writes (tracking keys of the training stages, ldm-eval's keys in
evaluation/evaluate.py); nothing is guessed from the shape of a name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ldm_users.layout import EVAL_DIR, EVAL_METRICS, HYDRA_CONFIG, HYDRA_DIR, HYDRA_OVERRIDES
from ldm_users.sweep import STATUS_FILE
from ldm_users.tracking import METRICS_FILE, read_metrics

EVAL_FILE = EVAL_METRICS  # ldm-eval's, in the job dir; ldm-train eval.enabled=true writes it to <run>/eval/
JOB_MARKERS = (HYDRA_DIR, METRICS_FILE, EVAL_FILE, STATUS_FILE)
# The loss each training stage logs (metrics.jsonl "log" records of that stage).
LOSS_KEYS = {"vae": "vae/loss", "ldm": "ldm/loss"}
# ldm-eval's metrics that are not one number per job (per-user breakdowns, confusions, paths), and the run
# settings it records (guidance scale and steps are columns of their own, not metrics).
EVAL_NOT_METRICS = ("per_user/", "confusion/")
EVAL_SETTINGS = ("guidance_scale",)
# ldm-eval's verdicts that are words or yes/no rather than numbers, kept beside its numeric metrics.
EVAL_VERDICTS = ("bottleneck/stage", "judge/reliable", "judge/advice")
# Columns every report has (CSV names); evaluation metrics follow them.
BASE_COLUMNS = ["job", "name", "status", "model", "hardware", "params_denoiser", "params_user_encoder", "params_vae",
                "steps", "final_loss", "images_per_sec", "peak_memory_gib", "vae_recon_psnr", "vae_recon_ssim",
                "vae_recon_fd"]


@dataclass
class JobRow:
    """One job of the report: its table columns, plus what labels and plots need."""

    columns: dict                       # BASE_COLUMNS, "guidance_scale" for evaluated jobs, "error", "job_dir"
    overrides: list[str] = field(default_factory=list)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # stage -> [(step, loss)] by step
    evaluation: dict[str, float] = field(default_factory=dict)               # numeric metrics + verdicts

    def value(self, column: str):
        """A column's value, training or evaluation."""
        return self.evaluation[column] if column in self.evaluation else self.columns.get(column)


def is_job_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in JOB_MARKERS)


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


def number(value):
    """value when it is a real number (not a bool, not NaN), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if isinstance(value, float) and math.isnan(value) else value


def _first_number(*values):
    return next((v for v in (number(x) for x in values) if v is not None), None)


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}/" if isinstance(value, dict) else f"{prefix}{key}"))
    else:
        out[prefix.rstrip("/")] = tree
    return out


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _hydra_config(job_dir: Path) -> dict:
    # Unresolved (it holds ${...}); only plain values such as model.name are read from it.
    path = job_dir / HYDRA_CONFIG
    if not path.exists():
        return {}
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:
        return {}


def _job_number(job_dir: Path, status: dict):
    if status.get("job") is not None:
        return int(status["job"])
    match = re.match(r"(\d+)_", job_dir.name)  # Hydra's sweep subdir: <job number>_<name>
    return int(match.group(1)) if match else None


@dataclass
class _Tracked:
    """What a job's metrics.jsonl says."""

    summary: dict = field(default_factory=dict)
    curves: dict[str, dict[int, float]] = field(default_factory=dict)
    last_logged: dict = field(default_factory=dict)  # the last LDM-stage log record's metrics
    peak_logged: float | None = None


def _read_tracked(records: list[dict]) -> _Tracked:
    tracked = _Tracked()
    for record in records:
        if record.get("event") == "summary":
            tracked.summary.update(record.get("summary") or {})
        elif record.get("event") == "log" and record.get("step") is not None:
            metrics = record.get("metrics") or {}
            stage = record.get("stage") or "ldm"
            loss = number(metrics.get(LOSS_KEYS.get(stage, "")))
            if loss is not None:  # a resumed run logs some steps again: the later value wins
                tracked.curves.setdefault(stage, {})[int(record["step"])] = float(loss)
            if stage == "ldm":
                tracked.last_logged = metrics
                peak = number(metrics.get("ldm/peak_memory_gib"))
                if peak is not None:
                    tracked.peak_logged = max(peak, tracked.peak_logged or 0.0)
    return tracked


def _state(status: dict, records: list[dict]) -> str:
    if status.get("status"):
        return status["status"]
    finishes = [r for r in records if r.get("event") == "finish"]
    if finishes:
        return "ok" if finishes[-1].get("exit_code") == 0 else "failed"
    return "unknown"


def _overrides(job_dir: Path, status: dict) -> list[str]:
    overrides = status.get("overrides")
    if overrides is None and (job_dir / HYDRA_OVERRIDES).exists():
        overrides = OmegaConf.to_container(OmegaConf.load(job_dir / HYDRA_OVERRIDES))
    return list(overrides or [])


def _evaluation(job_dir: Path, config: dict) -> tuple[dict, float | None] | None:
    """(numeric metrics, guidance scale) of the job's metrics.json, None when it was not evaluated."""
    evaluation = _load_json(job_dir / EVAL_FILE) or _load_json(job_dir / EVAL_DIR / EVAL_FILE)
    if not isinstance(evaluation, dict):
        return None
    flat = _flatten(evaluation)
    metrics = {k: v for k, v in flat.items() if (number(v) is not None or (k in EVAL_VERDICTS and v is not None))
               and k not in EVAL_SETTINGS and not k.startswith(EVAL_NOT_METRICS)}
    # Not in the metrics: the config the evaluation ran with says it.
    scale = _first_number(flat.get("guidance_scale"), (config.get("sampler") or {}).get("guidance_scale"))
    return metrics, scale


def load_job(job_dir: Path) -> JobRow:
    job_dir = Path(job_dir)
    status = _load_json(job_dir / STATUS_FILE) or {}
    records = read_metrics(job_dir / METRICS_FILE) if (job_dir / METRICS_FILE).exists() else []
    starts = [r for r in records if r.get("event") == "start"]
    config = (starts[-1].get("config") if starts else None) or _hydra_config(job_dir)
    tracked = _read_tracked(records)
    summary, last = tracked.summary, tracked.last_logged
    overrides = _overrides(job_dir, status)
    name = status.get("name") or (starts[-1].get("name") if starts else None) or ",".join(overrides) or job_dir.name
    row = JobRow(columns={
        "job": _job_number(job_dir, status), "name": name, "status": _state(status, records),
        "model": (config.get("model") or {}).get("name"), "hardware": (config.get("hardware") or {}).get("name"),
        "params_denoiser": number(summary.get("params/denoiser")),
        "params_user_encoder": number(summary.get("params/user_encoder")),
        "params_vae": number(summary.get("params/vae")),
        "steps": max(tracked.curves["ldm"]) if tracked.curves.get("ldm") else None,
        "final_loss": _first_number(summary.get("ldm/loss_smoothed"), last.get("ldm/loss")),
        "images_per_sec": _first_number(summary.get("ldm/images_per_sec_median"), last.get("ldm/images_per_sec")),
        "peak_memory_gib": _first_number(summary.get("ldm/peak_memory_gib"), tracked.peak_logged),
        # The VAE stage's reconstructions (evaluation/reconstruction.py): its FD is the autoencoder's ceiling.
        "vae_recon_psnr": number(summary.get("vae/recon_psnr")),
        "vae_recon_ssim": number(summary.get("vae/recon_ssim")),
        "vae_recon_fd": number(summary.get("vae/recon_fd_classifier")),
        "error": status.get("error"), "job_dir": str(job_dir),
    }, overrides=overrides, curves={stage: sorted(points.items()) for stage, points in tracked.curves.items()})
    evaluated = _evaluation(job_dir, config)
    if evaluated is not None:
        row.evaluation, row.columns["guidance_scale"] = evaluated
    return row
