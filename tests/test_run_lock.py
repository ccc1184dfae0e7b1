"""One writer per run dir: the lock ldm-train and ldm-eval hold on a run dir, its refusal, its takeover of an
abandoned lock, ranks sharing it, and errors that name a vanished file's real cause."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ldm_users import io, run_lock
from ldm_users.errors import CheckpointError, WriteConflict
from ldm_users.layout import RUN_LOCK
from ldm_users.run_lock import RunDirBusy, acquire, hold_run_dir
from ldm_users.sweep import STATUS_FILE
from ldm_users.training import checkpoint as ckpt
from tests.test_reliability import Running, _tiny_accelerator, _train, assert_same_final_state


def _forge(run_dir: Path, host: str, pid: int, heartbeat_age: float = 0.0) -> Path:
    """A lock file as another process would have left it."""
    path = run_dir / RUN_LOCK
    path.write_text(json.dumps({"host": host, "pid": pid, "program": "ldm-train", "started_at": time.time() - 600,
                                "token": f"forged-{pid}", "proc_start": None}))
    stamp = time.time() - heartbeat_age
    os.utime(path, (stamp, stamp))
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid no longer runs
    return child.pid


def test_second_holder_refuses_in_one_line_naming_the_holder(tmp_path):
    lock = acquire(tmp_path, "ldm-train")
    with pytest.raises(RunDirBusy) as refused:
        acquire(tmp_path, "ldm-eval")
    message = str(refused.value)
    assert "\n" not in message
    for part in (f"run dir {tmp_path} is in use by ldm-train pid {os.getpid()} on host {run_lock.HOST}, started ",
                 f"kill {os.getpid()} on {run_lock.HOST}", "another hydra.run.dir"):
        assert part in message, message
    lock.release()
    assert not (tmp_path / RUN_LOCK).exists()
    acquire(tmp_path, "ldm-train").release()  # free again once released


def test_abandoned_locks_are_taken_over_and_logged(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="ldm_users.run_lock")
    dead = _dead_pid()
    _forge(tmp_path, run_lock.HOST, dead)
    lock = acquire(tmp_path, "ldm-train")
    assert f"took over the lock on run dir {tmp_path} from ldm-train pid {dead} on host {run_lock.HOST}" in caplog.text
    assert f"process {dead} no longer runs" in caplog.text
    assert json.loads((tmp_path / RUN_LOCK).read_text())["pid"] == os.getpid()
    lock.release()

    # Another host: only its heartbeat tells. One that advances is a live holder; one that does not for STALE_S
    # (however recent its timestamp: clocks may disagree), or whose timestamp is that old, an abandoned lock.
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(run_lock, "STALE_S", 1.5)
    path = _forge(tmp_path, "node-elsewhere", 4242)
    beating = threading.Event()

    def beat():
        while not beating.wait(0.05):
            os.utime(path)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    with pytest.raises(RunDirBusy, match="pid 4242 on host node-elsewhere"):
        acquire(tmp_path, "ldm-train")
    beating.set()
    beater.join()
    _forge(tmp_path, "node-elsewhere", 4242, heartbeat_age=-100)  # stamped by a file server whose clock is ahead
    started = time.monotonic()
    acquire(tmp_path, "ldm-train").release()
    assert time.monotonic() - started >= 1.5 and "its heartbeat has not advanced for 2 s" in caplog.text
    _forge(tmp_path, "node-elsewhere", 4242, heartbeat_age=600)
    acquire(tmp_path, "ldm-train").release()
    assert re.search(r"its heartbeat stopped 60\d s ago", caplog.text), caplog.text

    # A live process on this host (here: this one) keeps its lock however old its heartbeat (it may be suspended).
    _forge(tmp_path, run_lock.HOST, os.getpid(), heartbeat_age=run_lock.STALE_S * 10)
    with pytest.raises(RunDirBusy):
        acquire(tmp_path, "ldm-train")


def test_heartbeat_keeps_the_lock_fresh_and_a_taken_over_lock_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = acquire(tmp_path, "ldm-train")
    path = tmp_path / RUN_LOCK
    old = time.time() - 1000
    os.utime(path, (old, old))
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 100  # touched again
    # Another process took the lock over (this one was judged gone): releasing must not remove its lock.
    _forge(tmp_path, "node-elsewhere", 4242)
    lock.release()
    assert json.loads(path.read_text())["pid"] == 4242


def test_ranks_of_one_job_share_the_lock(tmp_path, monkeypatch):
    _forge(tmp_path, run_lock.HOST, os.getpid())  # held by the job's main rank (this process stands in for it)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with hold_run_dir(tmp_path, "ldm-train") as lock:  # rank 1: neither refused nor taking a lock of its own
        assert lock is None
    assert json.loads((tmp_path / RUN_LOCK).read_text())["token"] == f"forged-{os.getpid()}"
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RunDirBusy):
        with hold_run_dir(tmp_path, "ldm-train"):
            pass


def _rank(rank: int, run_dir: str, port: int, out: str) -> None:
    """One rank of a two-process gloo job (a submitit job's tasks have their process group before the lock)."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        with hold_run_dir(run_dir, "ldm-train"):
            outcome = "held"
    except RunDirBusy as err:
        outcome = f"refused: {err}"
    if rank == 0:
        (Path(run_dir) / RUN_LOCK).unlink()  # the other job ended
    dist.barrier()
    with hold_run_dir(run_dir, "ldm-train") as lock:
        outcome += f" | then held, own lock file: {lock is not None}"
    Path(out, f"rank{rank}").write_text(outcome)
    dist.destroy_process_group()


def test_ranks_of_a_job_with_a_process_group_follow_the_main_rank(tmp_path):
    """Refused together (no rank left waiting in a collective), then holding the lock together."""
    import socket

    import torch.multiprocessing as mp

    _forge(tmp_path, run_lock.HOST, os.getpid())  # another job's main process
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank, args=(str(tmp_path), port, str(tmp_path)), nprocs=2)
    outcomes = [(tmp_path / f"rank{r}").read_text() for r in (0, 1)]
    for rank, outcome in enumerate(outcomes):
        assert outcome.startswith(f"refused: run dir {tmp_path} is in use by ldm-train pid {os.getpid()}"), outcome
        assert outcome.endswith(f"then held, own lock file: {rank == 0}"), outcome


def test_a_file_vanishing_mid_write_is_reported_as_another_writer_not_a_full_disk(tmp_path, monkeypatch):
    with pytest.raises(WriteConflict, match="gone.*another process is writing there too"):
        with io.atomic_path(tmp_path / "status.json") as tmp:
            tmp.write_text("{}")
            tmp.unlink()  # what another process's cleanup of "its" temporary did

    acc, _ = _tiny_accelerator()
    real_save = acc.save_state

    def save_then_vanish(output_dir, **kwargs):
        real_save(output_dir, **kwargs)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", output_dir)

    monkeypatch.setattr(acc, "save_state", save_then_vanish)
    with pytest.raises(CheckpointError) as err:
        ckpt.save_checkpoint(acc, tmp_path / "checkpoints", 1, {"stage": "ldm"})
    assert "vanished while it was being written: another process is writing there too" in str(err.value)
    assert "Free disk space" not in str(err.value)


@pytest.mark.slow
def test_second_ldm_train_refuses_and_a_sigkilled_holder_is_taken_over(tmp_path, session_cache):
    """Two ldm-train on one run dir: the second refuses at once with one line, the first ends untouched. A
    SIGKILLed run leaves its lock behind: the next run takes it over and resumes, ending bit-exact with the first."""
    first_dir, killed_dir = tmp_path / "first", tmp_path / "killed"
    short = "vae_train.max_steps=4"  # the VAE stage is not what this test is about
    # SIGKILLed by itself just before its 6th LDM step, so after checkpoint 4 and always while it holds the lock (a
    # kill sent from here once checkpoint 4 shows up can come after the run has finished, on a loaded machine).
    first = Running(first_dir, session_cache, short)
    killed = Running(killed_dir, session_cache, short, fault="ldm_users.training.steps:LdmTrainStep.__call__:6:kill")
    assert first.wait_for(first_dir / RUN_LOCK), first.finish()[1][-3000:]
    holder = json.loads((first_dir / RUN_LOCK).read_text())
    assert holder["pid"] == first.proc.pid

    started = time.monotonic()
    second = _train(first_dir, session_cache, short)
    assert second.returncode == 2, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: run dir {first_dir} is in use by ldm-train pid "
                                                   f"{first.proc.pid} on host {run_lock.HOST}"), second.stderr[-3000:]
    print(f"second ldm-train refused after {time.monotonic() - started:.1f} s")
    assert first.proc.poll() is None, "the first run ended before the second one tried: the test proves nothing"

    code, err = killed.finish()
    assert code == -signal.SIGKILL and (killed_dir / "ldm" / "checkpoints" / "checkpoint-0000004").is_dir(), err[-3000:]
    assert json.loads((killed_dir / RUN_LOCK).read_text())["pid"] == killed.proc.pid  # left behind

    code, err = first.finish()
    assert code == 0, err[-3000:]
    assert json.loads((first_dir / STATUS_FILE).read_text())["status"] == "ok"
    assert not (first_dir / RUN_LOCK).exists()  # released at the end

    rerun = _train(killed_dir, session_cache, short)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr  # Hydra logs to stdout
    assert f"took over the lock on run dir {killed_dir} from ldm-train pid {killed.proc.pid}" in log, log[-3000:]
    assert "resumed from" in log
    assert_same_final_state(killed_dir, first_dir)  # the refused second run changed nothing of the first
