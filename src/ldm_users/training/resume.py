"""Which checkpoint to resume from, and refusing the ones that belong to a different experiment."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm_users.config import to_container
from ldm_users.errors import CheckpointError
from ldm_users.training import checkpoint as ckpt

log = logging.getLogger(__name__)

USERS_FILE = "users.json"
CONFIG_FILE = "config.yaml"
ARCH_FILE = "architecture.json"


def architecture(cfg: DictConfig, stage: str) -> dict:
    """The config keys that decide the shapes of the weights: changing them makes a checkpoint unusable."""
    arch = {"vae": to_container(cfg.vae.autoencoder)}
    if stage == "ldm":
        arch["model"] = {"denoiser": to_container(cfg.model.denoiser),
                         "condition": to_container(cfg.model.condition) if cfg.model.get("condition") else None}
    return json.loads(json.dumps(arch, default=str))


def write_run_meta(folder: Path, cfg: DictConfig, users: list[str], stage: str = "ldm") -> None:
    folder = Path(folder)
    (folder / USERS_FILE).write_text(json.dumps({"users": users}, indent=1))
    (folder / ARCH_FILE).write_text(json.dumps(architecture(cfg, stage), indent=1, sort_keys=True))
    OmegaConf.save(OmegaConf.create(to_container(cfg)), folder / CONFIG_FILE)


def verify_compatible(checkpoint: Path, cfg: DictConfig, users: list[str], stage: str) -> None:
    users_file = checkpoint / USERS_FILE
    if users_file.exists():
        saved = json.loads(users_file.read_text())["users"]
        if saved != list(users):
            added = sorted(set(users) - set(saved))[:5]
            removed = sorted(set(saved) - set(users))[:5]
            raise CheckpointError(
                f"cannot resume from {checkpoint}: it was trained on a different user map ({len(saved)} users, now "
                f"{len(users)}; new: {added or '-'}, missing: {removed or '-'}). User indices would silently change "
                f"meaning. Use the original data.data_dir, or start a new run (train.resume=never or another run dir).")
    arch_file = checkpoint / ARCH_FILE
    if arch_file.exists():
        saved = json.loads(arch_file.read_text())
        current = architecture(cfg, stage)
        if saved != current:
            diffs = _diff(saved, current)
            raise CheckpointError(
                f"cannot resume from {checkpoint}: the model configuration changed ({'; '.join(diffs[:4])}). "
                f"Resume with the original model/vae settings, or start a new run (train.resume=never).")


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a} -> {b}"]


def resolve_resume(cfg: DictConfig, checkpoints_root: Path, users: list[str], stage: str) -> Path | None:
    """train.resume: auto (latest complete checkpoint here, if any) | never | a checkpoint PATH."""
    choice = str(cfg.train.get("resume", "auto"))
    if choice in ("never", "none", "false", "False"):
        return None
    if choice == "auto":
        found = ckpt.latest_checkpoint(checkpoints_root)
    else:
        found = Path(choice)
        if not (found / ckpt.STATE_FILE).exists():
            raise CheckpointError(f"train.resume={choice}: no complete checkpoint there (missing "
                                  f"{ckpt.STATE_FILE}). Point it at a checkpoint-<step> folder.")
        if ckpt.read_state(found).get("stage", stage) != stage:
            return None  # a checkpoint of the other stage: not for this one
    if found is not None:
        verify_compatible(found, cfg, users, stage)
    return found
