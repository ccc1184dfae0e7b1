"""SIGTERM and SIGINT (what SLURM, torchrun and Ctrl-C send) become a checkpoint and a clean exit.

While a training stage runs, the handlers only record the signal; the loop reads it at the next step boundary,
saves a checkpoint and raises TrainingInterrupted, which the entry point prints as one line and turns into
exit status 128 + the signal number (the shell's convention for "ended by this signal"). A signal that arrives
during a stage's last moments (final save, export) is kept for the next stage of the same process. With several
processes the flag is reduced across ranks, so every rank stops after the same step and they write one
checkpoint together, even when only some of them got the signal. A second signal stops at once, as usual.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from typing import Iterator

import torch

from ldm_users.errors import LdmUsersError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_pending = 0  # the first stop signal this process got and has not acted on yet (0: none)
_launcher_signals: set[int] = set()  # a job launcher's preemption signal, while its job runs (also_stop_on)


@contextlib.contextmanager
def also_stop_on(signum: int) -> Iterator[None]:
    """While active, `signum` stops training like SIGTERM (submitit's preemption/time-limit signal: see
    ldm_users.distributed, which then hands the stop back to submitit to requeue the job)."""
    _launcher_signals.add(signum)
    try:
        yield
    finally:
        _launcher_signals.discard(signum)


class TrainingInterrupted(LdmUsersError):
    """Stopped by a signal after saving a checkpoint; rerunning the same command resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """Context manager: while active, SIGTERM/SIGINT set the pending flag instead of ending the process."""

    def __init__(self):
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        # signal.signal only works in the main thread; elsewhere (a notebook's worker thread) keep the defaults.
        if threading.current_thread() is threading.main_thread():
            for sig in (*STOP_SIGNALS, *sorted(_launcher_signals)):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        global _pending
        if _pending:  # the second one: stop now, the way the process would have without us
            previous = self._previous.get(signum, signal.SIG_DFL)
            self.__exit__()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(signum)
            return
        _pending = signum
        # os.write, not print: the handler may interrupt a tqdm write to the same stream.
        os.write(2, f"\nldm-train: got {signal_name(signum)}: saving a checkpoint after this step, then stopping "
                    f"(send it again to stop at once, without a checkpoint).\n".encode())


def stop_on_signals(fn):
    """Decorate a training stage: stop signals are recorded (not fatal) while it runs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with StopSignals():
            return fn(*args, **kwargs)

    return wrapper


def stop_requested(accelerator=None) -> int:
    """The stop signal to act on at this step boundary (0: none): the same answer on every rank.

    Every rank must call this at the same steps (it is a collective when there are several processes).
    """
    signum = _pending
    if accelerator is not None and accelerator.num_processes > 1:
        flag = torch.tensor([signum], dtype=torch.int64, device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        signum = int(flag.item())
    return signum


def acknowledge() -> None:
    """The pending signal has been acted on (tests and notebooks may go on in the same process)."""
    global _pending
    _pending = 0


def interrupted(signum: int, what: str) -> TrainingInterrupted:
    """The exception that ends a stage after its checkpoint; `what` says where it stopped and what was saved."""
    acknowledge()
    return TrainingInterrupted(f"stopped by {signal_name(signum)} {what}. Run the same command again to resume "
                               "from there.", signum)
