"""Progress bars that suit where the output goes.

In a terminal a bar redraws a few times a second. In a log file (a SLURM `.out`, `ldm-train ... > train.log`) every
redraw is a carriage-return line, thousands per hour, so there a bar updates at most every `LOG_INTERVAL_S`
seconds: readable, and still proof of life.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def interactive() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def bar_options() -> dict:
    """tqdm keyword arguments for the current stderr (also for diffusers' `set_progress_bar_config`)."""
    if interactive():
        return {}
    return {"mininterval": LOG_INTERVAL_S, "maxinterval": max(LOG_INTERVAL_S, 10.0), "miniters": 1}


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) with the update interval chosen for the output (explicit kwargs win)."""
    return tqdm(iterable, **{**bar_options(), **kwargs})
