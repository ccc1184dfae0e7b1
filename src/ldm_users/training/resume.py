"""Which checkpoint to resume from: damaged ones are set aside, those of a different experiment refused."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from ldm_users.config import to_container
from ldm_users.errors import CheckpointError
from ldm_users.layout import CONFIG_FILE, USERS_FILE
from ldm_users.training import checkpoint as ckpt

log = logging.getLogger(__name__)

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


def restore(cfg: DictConfig, checkpoints_root: Path, users: list[str], stage: str, label: str,
            load: Callable[[Path], dict], accelerator) -> tuple[Path, dict] | None:
    """Load the checkpoint train.resume asks for with `load`; returns it and its trainer state (None: start at 0).

    train.resume=auto: the newest checkpoint here that loads. Damaged ones (ckpt.damage, or a failed load) are set
    aside as `*.damaged`, never deleted, and one warning says which and why: a requeued job resumes from the newest
    intact checkpoint instead of stopping. train.resume=never: none. train.resume=PATH: that one, and a damaged one
    is refused with the exact override for the newest intact checkpoint beside it. A checkpoint of another user map
    or model is refused either way (that is no damage). Every rank must call this (a collective with several).
    """
    choice = str(cfg.train.get("resume", "auto"))
    if choice in ("never", "none", "false", "False"):
        return None
    if choice != "auto":
        return _restore_explicit(Path(choice), cfg, users, stage, load)
    skipped: list[tuple[Path, str]] = []
    found, loaded_any = None, False
    for candidate in reversed(ckpt.list_checkpoints(checkpoints_root)):
        why, state = ckpt.damage(candidate), None
        if why is None:
            verify_compatible(candidate, cfg, users, stage)
            try:
                loaded_any = True
                state = load(candidate)
            except CheckpointError as err:
                why = getattr(err, "reason", None) or str(err)
        why = _agreed(accelerator, why)
        if why is None:
            found = (candidate, state)
            break
        skipped.append((candidate, why))
    if skipped:
        _set_aside(skipped, found, label, accelerator)
        if found is None and loaded_any:  # the model may hold half of a damaged checkpoint: not a fresh start
            raise CheckpointError(f"{label}: no checkpoint under {checkpoints_root} loads; the damaged ones were set "
                                  f"aside as *{ckpt.DAMAGED_SUFFIX}. Run the same command again to start over.")
    return found


def _agreed(accelerator, why: str | None) -> str | None:
    """The same verdict on every rank: a checkpoint one rank cannot load is skipped by all."""
    if accelerator.num_processes <= 1:
        return why
    flag = torch.tensor([0 if why is None else 1], dtype=torch.int64, device=accelerator.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() and why is None:
        return "another rank could not load it"
    return why


def _set_aside(skipped: list[tuple[Path, str]], found: tuple[Path, dict] | None, label: str, accelerator) -> None:
    if accelerator.is_main_process:
        for folder, _ in skipped:
            ckpt.set_aside(folder)
        which = "; ".join(f"{folder.name} ({why})" for folder, why in skipped)
        then = (f"resuming from {found[0].name}, the newest intact one" if found is not None
                else "no intact checkpoint is left: training starts from step 0")
        log.warning("%s: set aside damaged checkpoint(s) as *%s, kept for inspection: %s; %s.", label,
                    ckpt.DAMAGED_SUFFIX, which, then)
    accelerator.wait_for_everyone()


def _restore_explicit(path: Path, cfg: DictConfig, users: list[str], stage: str,
                      load: Callable[[Path], dict]) -> tuple[Path, dict] | None:
    if not (path / ckpt.STATE_FILE).exists():
        raise CheckpointError(f"train.resume={path}: no complete checkpoint there (missing {ckpt.STATE_FILE}). "
                              f"{_instead(path)}")
    why = ckpt.damage(path)
    if why is None:
        if ckpt.read_state(path).get("stage", stage) != stage:
            return None  # a checkpoint of the other stage: not for this one
        verify_compatible(path, cfg, users, stage)
        try:
            return path, load(path)
        except CheckpointError as err:
            why = getattr(err, "reason", None) or str(err)
    raise CheckpointError(f"cannot load checkpoint {path}: {why}. {_instead(path)}")


def _instead(path: Path) -> str:
    """The exact override for the newest intact checkpoint beside `path` (a damaged one is never suggested)."""
    beside = [c for c in ckpt.list_checkpoints(path.parent) if c.resolve() != path.resolve()]
    intact = next((c for c in reversed(beside) if ckpt.damage(c) is None), None)
    if intact is None:
        return "No intact checkpoint is beside it: start over with train.resume=never."
    override = f"train.resume={shlex.quote(str(intact))}"
    return f"The newest intact checkpoint beside it is {intact.name}: rerun with {override}"
