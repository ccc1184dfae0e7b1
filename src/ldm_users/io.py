"""Files and folders that are either whole or absent.

Every cache, checkpoint, export and status file is written under a temporary name beside its target and
renamed into place when complete (a rename is atomic on one file system), so a kill at any moment leaves the
old version, the new one, or nothing: never half a file that looks complete. Temporary names carry the pid, so
two processes building the same entry never write into each other's temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator


def _tmp_name(target: Path) -> Path:
    return target.with_name(f".tmp-{os.getpid()}-{target.name}")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a crash right after it must not undo it)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, directory: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `target` at; rename it into place when the block ends without error.

    directory=True yields a fresh empty folder. keep_existing=True is for content-addressed caches: when another
    process put `target` in place meanwhile (same key, same content), ours is dropped instead of replacing it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target)
    _remove(tmp)
    if directory:
        tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if keep_existing and target.exists():
        _remove(tmp)
        return
    if directory:
        replace_dir(tmp, target)
    else:
        os.replace(tmp, target)
        fsync_dir(target.parent)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the complete folder `tmp` to `final`, replacing what is there; a kill at any moment leaves a
    complete `final` (old or new) or none, never a half-deleted one that still looks complete."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".trash-{os.getpid()}-{final.name}")
        _remove(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        _remove(old)


def remove_dir(folder: str | os.PathLike) -> None:
    """Rename first, then delete: a kill halfway through never leaves a torn folder under a valid name."""
    folder = Path(folder)
    trash = folder.with_name(f".trash-{os.getpid()}-{folder.name}")
    try:
        os.replace(folder, trash)
    except OSError:
        return
    _remove(trash)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
