"""One writer per run dir: a lock file naming its holder, which a crashed holder never leaves blocking.

ldm-train (and ldm-eval where it writes into a trained run's dir) holds `<run dir>/.ldm-run.lock` for as long as
it writes there. A second process on the same dir (a double-submitted job, a requeue overlapping its predecessor,
a second terminal) refuses at once with one line naming the holder, instead of racing it for the same files.

The lock is a file created with O_CREAT|O_EXCL, atomic on local disks and on the shared file systems runs live on
(NFSv3+, Lustre, GPFS); fcntl/flock locks are not used: some NFS setups ignore them, and an NFS client that loses
its lease drops them without telling the holder. The file records the holder's host, pid, process start time and
start time; a daemon thread touches it every HEARTBEAT_S seconds. A lock whose holder is gone is taken over, with a
warning in the log: on the same host when its pid no longer runs (or now belongs to another process), at once; on
another host when its heartbeat has stopped, which is watched rather than computed from timestamps alone (the
nodes' clocks and the file server's may disagree): a heartbeat that advances within two beats is a live holder
(refused), one that has not advanced for STALE_S seconds (or whose timestamp is that old) an abandoned lock. So a
crash, a SIGKILL or a lost node never blocks the next run for long.

The ranks of one distributed job share the lock: only the main rank takes it, and where a process group already
exists (submitit's tasks) the others learn its answer, so they refuse with it instead of waiting in a collective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ldm_users.errors import LdmUsersError
from ldm_users.layout import RUN_LOCK
from ldm_users.runtime import is_main_rank, world_size

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
# Another host's lock counts as abandoned once its heartbeat has not advanced for this long (or its timestamp is
# this old): many missed beats, with room for a busy holder, clock skew and a file server's attribute caching.
STALE_S = 60.0
HOST = socket.gethostname()


class RunDirBusy(LdmUsersError):
    """Another process is writing into this run dir."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    program: str
    started_at: float
    token: str
    proc_start: str | None    # the pid's start time (Linux /proc): tells a reused pid from the holder
    heartbeat_at: float       # the lock file's mtime: when the holder last touched it (the file server's clock)

    @property
    def heartbeat_age(self) -> float:
        return max(time.time() - self.heartbeat_at, 0.0)

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return f"{self.program} pid {self.pid} on host {self.host}, started {started}"


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from Linux's /proc; None elsewhere or when it does not exist."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the name may hold spaces
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]  # fields 3 (state) and 22 (starttime)


def _proc_start(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _read(path: Path) -> Holder | None:
    """The holder recorded in `path`; None when the file is gone or not (yet) complete."""
    try:
        # Opening (not just stat-ing) makes an NFS client revalidate the file: the heartbeat is seen fresh.
        with open(path, encoding="utf-8") as f:
            mtime = os.fstat(f.fileno()).st_mtime
            record = json.loads(f.read())
        return Holder(host=str(record["host"]), pid=int(record["pid"]), program=str(record.get("program", "?")),
                      started_at=float(record["started_at"]), token=str(record["token"]),
                      proc_start=record.get("proc_start"), heartbeat_at=mtime)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None


def gone(path: Path, holder: Holder) -> str | None:
    """Why `holder` no longer writes (its lock may be taken over), or None while it may."""
    if holder.host != HOST:
        return _heartbeat_stopped(path, holder)
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return f"process {holder.pid} no longer runs"
    except PermissionError:
        pass  # another user's process: it runs
    stat = _proc_stat(holder.pid)
    if stat and stat[0] == "Z":
        return f"process {holder.pid} has ended"
    if holder.proc_start and stat and stat[1] != holder.proc_start:
        return f"process {holder.pid} has ended (the pid now belongs to another process)"
    return None  # alive, perhaps suspended (Ctrl-Z): it may resume writing


def _heartbeat_stopped(path: Path, holder: Holder) -> str | None:
    """Watch another host's lock: None as soon as its heartbeat advances (a live holder, or a new one), the reason
    once it has not for STALE_S seconds of watching, or within two beats when its timestamp is that old already."""
    started, announced = time.monotonic(), False
    while True:
        watched = time.monotonic() - started
        if watched > STALE_S:
            return f"its heartbeat has not advanced for {watched:.0f} s"
        if watched > 2 * HEARTBEAT_S + 1 and holder.heartbeat_age > STALE_S:
            return f"its heartbeat stopped {holder.heartbeat_age:.0f} s ago"
        if watched > 2 * HEARTBEAT_S + 1 and not announced:
            log.warning("run dir %s is locked by %s, whose heartbeat stopped %.0f s ago: waiting up to %.0f s "
                        "before taking it over.", path.parent, holder.describe(), holder.heartbeat_age,
                        STALE_S - watched)
            announced = True
        time.sleep(min(0.5, HEARTBEAT_S / 4))
        now = _read(path)
        if now is None or now.token != holder.token or now.heartbeat_at != holder.heartbeat_at:
            return None


def busy_message(run_dir: Path, holder: Holder) -> str:
    return (f"run dir {run_dir} is in use by {holder.describe()} (heartbeat {holder.heartbeat_age:.0f} s ago). "
            f"Wait for it to finish, or stop it (kill {holder.pid} on {holder.host}) and rerun to resume, or choose "
            f"another hydra.run.dir.")


class RunLock:
    """A lock held by this process: its heartbeat runs until `release`."""

    def __init__(self, path: Path, token: str):
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-dir-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = _read(self.path)
            if holder is None or holder.token != self.token:
                log.warning("the lock %s is no longer ours (%s): another process may now write into this run dir.",
                            self.path, holder.describe() if holder else "the file was removed")
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S + 5)
        holder = _read(self.path)
        if holder is not None and holder.token == self.token:  # never remove a lock another process took over
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def acquire(run_dir: str | os.PathLike, program: str) -> RunLock:
    """Take the lock on `run_dir`, taking over an abandoned one; RunDirBusy (one line) while another holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_LOCK
    token = uuid.uuid4().hex
    record = {"host": HOST, "pid": os.getpid(), "program": program, "started_at": time.time(), "token": token,
              "proc_start": _proc_start(os.getpid())}
    taken_over: tuple[Holder, str] | None = None
    deadline = time.monotonic() + 10.0
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:  # being written by its new holder, or just removed: look again
                age = _age(path)
                if age is not None and age > STALE_S:  # an unreadable leftover, e.g. from a full disk
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                elif time.monotonic() > deadline:
                    raise RunDirBusy(f"run dir {run_dir} has an unreadable lock file {path}: if no other process "
                                     f"writes there, delete it and rerun.") from None
                time.sleep(0.1)
                continue
            why = gone(path, holder)
            if why is None:
                raise RunDirBusy(busy_message(run_dir, _read(path) or holder)) from None
            if _remove_if_unchanged(path, holder):
                taken_over = (holder, why)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
        break
    if taken_over is not None:
        holder, why = taken_over
        log.warning("took over the lock on run dir %s from %s: %s.", run_dir, holder.describe(), why)
    return RunLock(path, token)


def _remove_if_unchanged(path: Path, holder: Holder) -> bool:
    """Remove the abandoned lock of `holder`, unless another process replaced it meanwhile. Several processes may
    find the same abandoned lock at once: a guard file (exclusive create again) lets one of them check and remove."""
    guard = path.with_name(path.name + ".takeover")
    try:
        os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        age = _age(guard)
        if age is not None and age > 10.0:  # left by a process killed while taking over
            with contextlib.suppress(FileNotFoundError):
                guard.unlink()
        time.sleep(0.1)
        return False
    try:
        current = _read(path)
        if current is None or current.token != holder.token:
            return False
        path.unlink()
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            guard.unlink()


def _shared_with_ranks(refusal: str | None) -> str | None:
    """The main rank's answer, on every rank, where the job's process group exists already; elsewhere (torchrun,
    accelerate launch) the launcher stops the other ranks when the main one exits."""
    if world_size() <= 1:
        return refusal
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return refusal
    box = [refusal]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def hold_run_dir(run_dir: str | os.PathLike, program: str) -> Iterator[RunLock | None]:
    """Hold the lock on `run_dir` for the block (main rank only; the job's other ranks share it)."""
    lock, refusal = None, None
    if is_main_rank():
        try:
            lock = acquire(run_dir, program)
        except RunDirBusy as err:
            refusal = str(err)
    refusal = _shared_with_ranks(refusal)
    if refusal is not None:
        if lock is not None:
            lock.release()
        raise RunDirBusy(refusal)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
