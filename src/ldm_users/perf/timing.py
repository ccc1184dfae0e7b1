"""Wall-clock timing that waits for the accelerator (CUDA kernels run asynchronously)."""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, warmup: int, iters: int) -> tuple[list[float], list[float]]:
    """Calls fn(i) warmup + iters times; returns (warm-up seconds, timed seconds), each call synchronised."""
    warm, timed = [], []
    for i in range(warmup + iters):
        synchronize(device)
        t0 = time.perf_counter()
        fn(i)
        synchronize(device)
        (warm if i < warmup else timed).append(time.perf_counter() - t0)
    return warm, timed


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")
