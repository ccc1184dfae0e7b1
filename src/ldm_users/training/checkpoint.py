"""Atomic checkpoints and resume.

A checkpoint is a folder `checkpoint-<step>` written by accelerate's `save_state` (model weights as
safetensors; optimizer, LR scheduler, grad scaler and RNG states as torch files read back with
weights_only=True) plus our own files: EMA weights (safetensors), trainer state, the user map and the
resolved config. It is written into a hidden temporary folder and renamed into place only when complete,
so a kill at any moment leaves either the previous checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ldm_users import io
from ldm_users.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


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
    final = root / f"checkpoint-{step:07d}"
    tmp = root / f".tmp-checkpoint-{step:07d}"
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
        raise CheckpointError(f"could not write checkpoint {final}: {err.strerror or err}. "
                              f"Free disk space or fix permissions under {root}; the last complete checkpoint "
                              f"is {previous or 'none'} and is intact.") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and total_limit:
        for old in list_checkpoints(root)[:-total_limit]:
            io.remove_dir(old)
    return final


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
    """Restore the accelerate state; a truncated or tampered file becomes a clear CheckpointError."""
    state = read_state(checkpoint)
    # Weights are only ever read from safetensors: accelerate would fall back to a pickled pytorch_model.bin.
    if not (Path(checkpoint) / "model.safetensors").is_file():
        raise CheckpointError(f"cannot load checkpoint {checkpoint}: model.safetensors is missing (weights are only "
                              "read from safetensors). Resume from another checkpoint with train.resume=PATH or "
                              "start over with train.resume=never.")
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as err:  # safetensors, torch.load(weights_only=True) and shape errors all land here
        raise CheckpointError(f"cannot load checkpoint {checkpoint}: {type(err).__name__}: {str(err)[:300]}. "
                              "The files are truncated, tampered with or from another model; resume from an "
                              "earlier checkpoint with train.resume=PATH or start over with train.resume=never."
                              ) from None
    return state


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


load_tensors = io.read_tensors  # safetensors only; a torn file is a CheckpointError (shared with inference/)


def _write_json(path: Path, obj) -> None:
    # Inside the temporary folder: the rename of the whole folder is what makes it atomic.
    path.write_text(json.dumps(obj, indent=1, default=str))
