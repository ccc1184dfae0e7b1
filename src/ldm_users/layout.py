"""The file and folder names of runs, checkpoints and exports, and the one answer to "how was this trained".

A run dir (ldm-train's job dir):

    <run>/.hydra/config.yaml      Hydra's composed config, written before the run starts (unresolved)
    <run>/vae/checkpoints/checkpoint-<step>/   the VAE stage's checkpoints (and the LDM's under <run>/ldm/)
    <run>/vae/final/              the trained VAE (diffusers layout)
    <run>/{vae,ldm}/samples/      each stage's grids
    <run>/export/                 the pipeline (diffusers layout + users.json + training_config.yaml)
    <run>/snapshots/<s>s/         exports at points of the training clock (train.snapshot_at_seconds)
    <run>/eval/metrics.json       ldm-eval's figures (eval.enabled=true)

A checkpoint folder holds trainer_state.json, config.yaml and users.json beside accelerate's state and the
weights (model.safetensors, ema.safetensors). Imports only the standard library, so training, inference,
evaluation and reporting can all name these paths.
"""

from __future__ import annotations

import re
from pathlib import Path

# -- run dirs ----------------------------------------------------------------------------------------------------
HYDRA_DIR = ".hydra"
HYDRA_CONFIG = f"{HYDRA_DIR}/config.yaml"
HYDRA_OVERRIDES = f"{HYDRA_DIR}/overrides.yaml"
VAE_STAGE, LDM_STAGE = "vae", "ldm"     # a stage's folder in the run dir, and its metric prefix
FINAL = "final"                         # <run>/vae/final: the VAE the LDM stage encodes with
EXPORT = "export"
SNAPSHOTS = "snapshots"                 # <run>/snapshots/<seconds>s: an export each
SNAPSHOT_FILE = "snapshot.json"         # in each snapshot: step, train_seconds, images_seen
SAMPLES = "samples"                     # a stage's grids: <run>/<stage>/samples/
EVAL_DIR = "eval"
EVAL_METRICS = "metrics.json"           # ldm-eval's, in its job dir or <run>/eval/
RUN_LOCK = ".ldm-run.lock"              # held by the one process writing into the run dir (run_lock.py)

# -- checkpoints -------------------------------------------------------------------------------------------------
CHECKPOINTS = "checkpoints"             # <run>/<stage>/checkpoints/checkpoint-<step>
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
DAMAGED_SUFFIX = ".damaged"             # checkpoint-<step>.damaged: set aside by a resume, kept for inspection
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.yaml"             # the run's resolved config, as it stood when the checkpoint was written
USERS_FILE = "users.json"               # also in exports

# -- exports -----------------------------------------------------------------------------------------------------
MODEL_INDEX = "model_index.json"
TRAINING_CONFIG_FILE = "training_config.yaml"   # the run's resolved config, as it stood at export


def stage_dir(run_dir, stage: str) -> Path:
    return Path(run_dir) / stage


def vae_final(run_dir) -> Path:
    return Path(run_dir) / VAE_STAGE / FINAL


def export_dir(run_dir) -> Path:
    return Path(run_dir) / EXPORT


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def is_checkpoint(path) -> bool:
    return (Path(path) / STATE_FILE).exists() and (Path(path) / CONFIG_FILE).exists()


def is_export(path) -> bool:
    return (Path(path) / MODEL_INDEX).exists()


def run_of_export(export) -> Path | None:
    """The ldm-train run dir an export sits in (`<run>/export`), or None."""
    export = Path(export)
    run_dir = export.parent
    return run_dir if export.name == EXPORT and (run_dir / HYDRA_CONFIG).exists() else None


def trained_config_file(path) -> Path | None:
    """The config a model (an export or a checkpoint folder) was trained with.

    The snapshot written during the run: a checkpoint's config.yaml, an export's training_config.yaml. Those hold
    what the run filled in as it went (data.num_users counted from the dataset, resolved paths and learning
    rate), which the run dir's .hydra/config.yaml, composed before the run started, lacks. That one is the answer
    only for exports written before exports carried their config.
    """
    path = Path(path)
    if is_checkpoint(path):
        return path / CONFIG_FILE
    if (path / TRAINING_CONFIG_FILE).exists():
        return path / TRAINING_CONFIG_FILE
    run_dir = run_of_export(path)
    return run_dir / HYDRA_CONFIG if run_dir is not None else None
