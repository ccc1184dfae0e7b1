"""A job's tracker, finished exactly once (ldm-train, ldm-eval).

Whatever ends the block, the tracker is finished: with exit code 0 when the block completes, 1 when it raises (the
W&B run then shows failed, and its derived summary is still written). The exception itself goes on to the caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def tracked(tracker) -> Iterator:
    exit_code = 1
    try:
        yield tracker
        exit_code = 0
    finally:
        tracker.finish(exit_code)
