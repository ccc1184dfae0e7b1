"""Atomic checkpoints and resume.

A checkpoint is a folder `checkpoint-<step>` written by accelerate's `save_state` (model weights as
safetensors; optimizer, LR scheduler, grad scaler and RNG states as torch files read back with
weights_only=True) plus our own files: EMA weights (safetensors), trainer state, the user map and the
resolved config. It is written into a hidden temporary folder and renamed into place only when complete,
so a kill at any moment leaves either the previous checkpoint or the new one, never a torn one.

A checkpoint damaged afterwards (a failing disk, a file truncated by hand) is recognised by `damage`, from its
files' headers and sizes without loading them; resuming sets such a checkpoint aside (renamed `*.damaged`, never
deleted: training/resume.py) and rotation never deletes the newest intact checkpoint while only damaged ones are
newer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ldm_users import io
from ldm_users.errors import CheckpointError, os_error_fix
from ldm_users.layout import CHECKPOINT_RE, DAMAGED_SUFFIX, STATE_FILE, WEIGHTS_FILE, checkpoint_name

log = logging.getLogger(__name__)

RESUME_ADVICE = ("The files are truncated, tampered with or from another model; resume from an earlier checkpoint "
                 "with train.resume=PATH or start over with train.resume=never.")


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files cannot be loaded; `reason` says which file and how, in a few words."""

    def __init__(self, checkpoint: Path, reason: str, advice: str = RESUME_ADVICE):
        self.checkpoint, self.reason = Path(checkpoint), reason
        super().__init__(f"cannot load checkpoint {checkpoint}: {reason}. {advice}")


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under root, oldest first. Temporary folders are never returned."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and
             (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(accelerator, root: str | os.PathLike, step: int, state: dict,
                    write_extra: Callable[[Path], None] | None = None, total_limit: int | None = None) -> Path:
    """Write checkpoint-<step> atomically; every rank must call this (accelerate gathers what it needs).

    An OSError (disk full, read-only or vanished folder) becomes a CheckpointError naming the last complete
    checkpoint, which is left as it was.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    failure = None
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)
    except OSError as err:
        failure = err
    accelerator.wait_for_everyone()
    try:
        if failure is not None:
            raise failure
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            if write_extra is not None:
                write_extra(tmp)
            # The state file goes last: list_checkpoints treats a folder without it as incomplete.
            _write_json(tmp / STATE_FILE, {**state, "step": step})
            io.fsync_tree(tmp)
            io.replace_dir(tmp, final)
    except OSError as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        raise CheckpointError(f"could not write checkpoint {final}: {err.strerror or err}. {os_error_fix(err, root)} "
                              f"The last complete checkpoint is {previous or 'none'} and is intact.") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and total_limit:
        rotate(root, total_limit)
    return final


def rotate(root: str | os.PathLike, total_limit: int) -> None:
    """Delete all but the newest `total_limit` checkpoints, except the newest intact one while every checkpoint
    kept is damaged: a resume would need it."""
    found = list_checkpoints(root)
    old, kept = found[:-total_limit], found[-total_limit:]
    if old and all(damage(c) for c in reversed(kept)):
        spare = next((c for c in reversed(old) if damage(c) is None), None)
        if spare is not None:
            old.remove(spare)
            log.warning("kept %s beyond checkpoints_total_limit=%d: the newer checkpoints are damaged and it is the "
                        "newest intact one.", spare, total_limit)
    for c in old:
        io.remove_dir(c)


def damage(checkpoint: str | os.PathLike) -> str | None:
    """Why `checkpoint` cannot be loaded, judged from its files without loading them; None when they look whole.

    The state and the other JSON files must parse, every safetensors file (weights, EMA) be as long as its header
    says, every torch file (optimizer, LR scheduler, grad scaler) have its zip directory, which sits at its end.
    RNG states are not checked: loading ignores an unreadable one (every step is reseeded).
    """
    folder = Path(checkpoint)
    if not (folder / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    if not (folder / WEIGHTS_FILE).is_file():
        return f"{WEIGHTS_FILE} is missing (weights are only read from safetensors)"
    try:
        files = sorted(folder.iterdir())
    except OSError as err:
        return f"its folder cannot be read ({err.strerror or err})"
    for path in files:
        why = None
        if path.suffix == ".safetensors":
            why = io.tensor_file_damage(path)
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                why = f"{path.name} is truncated or not JSON"
        elif path.suffix in (".bin", ".pt") and not zipfile.is_zipfile(path):
            why = f"{path.name} is truncated or not a torch file"
        if why is not None:
            return why
    return None


def set_aside(checkpoint: str | os.PathLike) -> Path:
    """Rename a damaged checkpoint out of the resume order (`checkpoint-<step>.damaged`), keeping its files."""
    checkpoint = Path(checkpoint)
    target, n = checkpoint.with_name(checkpoint.name + DAMAGED_SUFFIX), 2
    while target.exists():
        target, n = checkpoint.with_name(f"{checkpoint.name}{DAMAGED_SUFFIX}-{n}"), n + 1
    os.replace(checkpoint, target)
    io.fsync_dir(target.parent)
    return target


def _remove_leftovers(root: Path) -> None:
    """Temporary and half-deleted folders of earlier killed runs (only this run writes under root)."""
    for p in root.iterdir():
        if p.name.startswith((".tmp-checkpoint-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True)


def read_state(checkpoint: Path) -> dict:
    try:
        return json.loads((Path(checkpoint) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{checkpoint}/{STATE_FILE} is missing or corrupt ({err}); "
                              "it is not a complete checkpoint.") from None


def load_checkpoint(accelerator, checkpoint: Path) -> dict:
    """Restore the accelerate state; a truncated or tampered file becomes a DamagedCheckpoint naming it."""
    # Weights are only ever read from safetensors: accelerate would fall back to a pickled pytorch_model.bin.
    why = damage(checkpoint)
    if why is not None:
        raise DamagedCheckpoint(checkpoint, why)
    state = read_state(checkpoint)
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as err:  # safetensors, torch.load(weights_only=True) and shape errors all land here
        raise DamagedCheckpoint(checkpoint, f"{type(err).__name__}: {str(err)[:300]}") from None
    return state


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


load_tensors = io.read_tensors  # safetensors only; a torn file is a CheckpointError (shared with inference/)


def _write_json(path: Path, obj) -> None:
    # Inside the temporary folder: the rename of the whole folder is what makes it atomic.
    path.write_text(json.dumps(obj, indent=1, default=str))
