"""Files and folders that are either whole or absent.

Every cache, checkpoint, export and status file is written under a temporary name beside its target and
renamed into place when complete (a rename is atomic on one file system), so a kill at any moment leaves the
old version, the new one, or nothing: never half a file that looks complete. Temporary names carry the pid, so
two processes building the same entry never write into each other's temporary folder.

Caches shared by several processes (the ranks of a job, the jobs of a sweep, several nodes on one shared file
system) are built once, under a file lock, by `build_once`: the others wait on the lock, then read the result.
Tensors are read back from safetensors only (`read_tensors`), so reading a file can never run code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout
from safetensors.torch import load_file

from ldm_users.errors import CheckpointError, DataError, WriteConflict, os_error_fix

log = logging.getLogger(__name__)


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


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` and the folder itself to disk (before renaming it into place)."""
    for p in Path(folder).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(Path(folder))


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
        _rename(tmp, target)
        fsync_dir(target.parent)


def _rename(src: Path, dst: Path) -> None:
    """os.replace; a source that vanished meanwhile is reported as what it means (another process writing the same
    files, or deleting them), not as a missing file or a full disk."""
    try:
        os.replace(src, dst)
    except FileNotFoundError as err:
        if os.path.lexists(src):
            raise
        raise WriteConflict(f"could not move {src} into place as {dst.name}: it is gone. "
                            f"{os_error_fix(err, dst.parent)}") from None


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
        _rename(final, old)
    _rename(tmp, final)
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


def build_once(target: str | os.PathLike, build: Callable[[Path], None], ready: Callable[[Path], bool] | None = None,
               directory: bool = False) -> Path:
    """Make `target` exist, built by exactly one of the processes asking for it at the same time.

    The first process to take the lock `.<name>.lock` beside `target` calls `build(tmp)`, which writes the entry at
    `tmp` (through atomic_path: a kill leaves no half entry); the others block on the lock (logged once), then find
    the entry ready and build nothing. `ready(target)` says whether an existing entry is usable (default: it
    exists); an unusable one (torn by hand, another format) is rebuilt. The lock is a `filelock.FileLock` (flock):
    released by the kernel when its holder dies, and honoured across nodes on a shared file system that supports
    locks (NFSv4, Lustre/GPFS mounted with flock; filelock falls back to a lock file where flock is missing).
    """
    target = Path(target)
    ready = ready or Path.exists
    if ready(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.with_name(f".{target.name}.lock")))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        log.info("waiting for another process to finish building %s", target)
        lock.acquire()
    try:
        if not ready(target):
            with atomic_path(target, directory=directory) as tmp:
                build(tmp)
    finally:
        lock.release()
    return target


def require_free_space(folder: str | os.PathLike, needed: int, what: str, setting: str = "paths.cache_dir") -> None:
    """Refuse early, naming the folder and the bytes, when `folder`'s disk cannot hold `needed` more bytes."""
    folder = Path(folder)
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DataError(f"{what} needs {_size(needed)} ({needed:,} bytes) in {folder}, but its disk has {_size(free)} "
                        f"free. Free space there, or point {setting} (or $LDM_USERS_CACHE) at a larger disk.")


def _size(n: float) -> str:
    units = ["B", "kB", "MB", "GB", "TB"]
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.1f} {units[i]}"


def tensor_file_damage(path: str | os.PathLike) -> str | None:
    """Why the safetensors file `path` is not whole, read from its header and size alone (no tensor is read);
    None when it is. Catches truncation, an empty file and a foreign format, cheaply enough to check every
    checkpoint of a run."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 0 or length > size - 8:
                return f"{path.name} is truncated or not safetensors: {size:,} bytes, no complete header"
            header = json.loads(f.read(length))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as err:
        return f"{path.name} cannot be read ({err.strerror or err})"
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return f"{path.name} is not safetensors (unreadable header)"
    expected = 8 + length + end
    if size < expected:
        return f"{path.name} is truncated: {size:,} of {expected:,} bytes"
    if size > expected:
        return f"{path.name} is damaged: {size:,} bytes where its header says {expected:,}"
    return None


def read_tensors(path: str | os.PathLike) -> dict:
    """Tensors from a safetensors file (never a pickle: reading cannot run code); a torn or foreign file is a
    CheckpointError naming it."""
    try:
        return load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"cannot read {path}: {err}. The file is truncated or not safetensors.") from None
