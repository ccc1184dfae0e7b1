"""What a run is compared by, derived from its whole logged history (every attempt of a resumed run).

Computed when a tracker finishes, from `metrics.jsonl`, so a run resumed after a kill reports the same figures as
one that never stopped, and a rerun that trains no step (e.g. `eval.enabled=true` after training) never writes a
NaN over them:
  <stage>/loss_smoothed          mean of the last `SMOOTH_WINDOW` logged losses (each a mean over a log interval)
  <stage>/images_per_sec_median  median over every logged interval of the run (not the last window only)
  <stage>/peak_memory_gib        the largest logged peak
  <stage>/wall_clock_s           time spent in the stage, summed over the attempts
"""

from __future__ import annotations

import math
import statistics

SMOOTH_WINDOW = 5


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metric key -> [(step, value)] in step order, the last value per step (a rerun may log a step again)."""
    by_key: dict[str, dict[int, float]] = {}
    for rec in records:
        if rec.get("event") != "log" or rec.get("step") is None:
            continue
        for key, value in (rec.get("metrics") or {}).items():
            if _finite(value):
                by_key.setdefault(key, {})[int(rec["step"])] = float(value)
    return {key: sorted(steps.items()) for key, steps in by_key.items()}


def _wall_clock(records: list[dict]) -> dict[str, float]:
    """Seconds per stage: from each `stage` event to the last record of that stage in the same attempt."""
    total: dict[str, float] = {}
    current, began, last = None, None, None

    def close():
        if current is not None and began is not None and last is not None:
            total[current] = total.get(current, 0.0) + max(0.0, last - began)

    for rec in records:
        event, t = rec.get("event"), rec.get("time")
        if event in ("start", "stage"):
            close()
            current, began, last = (rec.get("stage"), t, t) if event == "stage" else (None, None, None)
        elif current is not None and t is not None and rec.get("stage", current) == current:
            last = t
    close()
    return total


def derived_summary(records: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, points in _series(records).items():
        prefix, _, name = key.rpartition("/")
        values = [v for _, v in points]
        if not prefix or not values:
            continue
        if name == "loss":
            out[f"{prefix}/loss_smoothed"] = sum(values[-SMOOTH_WINDOW:]) / len(values[-SMOOTH_WINDOW:])
        elif name == "images_per_sec":
            out[f"{prefix}/images_per_sec_median"] = statistics.median(values)
        elif name == "peak_memory_gib":
            out[f"{prefix}/peak_memory_gib"] = max(values)
    for stage, seconds in _wall_clock(records).items():
        if stage:
            out[f"{stage}/wall_clock_s"] = round(seconds, 3)
    return out
