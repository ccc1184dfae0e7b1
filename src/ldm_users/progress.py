"""Progress bars that suit where the output goes.

In a terminal a bar redraws a few times a second. In a log file (a SLURM `.out`, `ldm-train ... > train.log`) every
redraw is a carriage-return line, thousands per hour, so there a bar updates at most every `LOG_INTERVAL_S`
seconds: readable, and still proof of life. Third-party bars (diffusers' sampling bar) are off in log files: see
UserLDMPipeline's `show_progress`.

In a terminal, a log line written while a bar is drawn would land inside the bar's line (and the next redraw
would overwrite it): there the console's log handlers write through `tqdm.write`, which clears the bars first
and redraws them after. In a file nothing is redrawn, and every log line and bar update is flushed as it is
written, so the two follow each other in order.
"""

from __future__ import annotations

import logging
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


class _BarAwareHandler(logging.StreamHandler):
    """A console log handler that writes through tqdm.write (clearing and redrawing the bars around the line)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)


def route_logs_around_bars() -> None:
    """In a terminal, make the root logger's console handlers bar-aware (Hydra sets them up again for each job,
    so this runs whenever a bar is made)."""
    if not interactive():
        return
    root = logging.getLogger()
    for i, handler in enumerate(root.handlers):
        if type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr):
            aware = _BarAwareHandler(handler.stream)
            aware.setLevel(handler.level)
            aware.setFormatter(handler.formatter)
            aware.filters = list(handler.filters)
            root.handlers[i] = aware


def show_postfix(bar: tqdm, **values) -> None:
    """Put `values` (loss, lr, ...) after the bar. In a terminal it redraws now; in a log file the bar's next timed
    update shows them (a redraw per training log line would bring back a bar line every few seconds)."""
    bar.set_postfix(values, refresh=interactive())


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) with the update interval chosen for the output (explicit kwargs win)."""
    route_logs_around_bars()
    return tqdm(iterable, **{**bar_options(), **kwargs})
