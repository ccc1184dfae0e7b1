"""The training clock: seconds spent in a stage's optimizer steps, and the time targets that act on it.

`train.max_train_seconds` (stop the stage, checkpoint and export as at a normal end) and
`train.snapshot_at_seconds` (export the pipeline when the clock first crosses each value) count *training time*
only: sample grids, checkpoint saves, snapshot exports and the VAE stage are left out, so that a time budget
compares recipes rather than I/O. The accumulated seconds and the snapshots taken go into every checkpoint's
trainer state, so a resumed run continues the clock where it stopped (and does not repeat a snapshot).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from ldm_users.errors import ConfigError

now = time.perf_counter  # module-level so the tests can replace it with a fake clock


def snapshot_name(seconds: float) -> str:
    """The folder of a snapshot under <run>/snapshots: `30s`, `2.5s`."""
    return f"{float(seconds):g}s"


@dataclass
class TrainingClock:
    max_seconds: float | None = None
    snapshot_at: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    taken: dict[str, int] = field(default_factory=dict)  # snapshot name -> step it was taken at
    _t0: float | None = None

    @classmethod
    def from_cfg(cls, keys: DictConfig, keys_name: str) -> TrainingClock:
        limit = keys.get("max_train_seconds")
        at = sorted(float(s) for s in (keys.get("snapshot_at_seconds") or []))
        if (limit is not None and float(limit) <= 0) or any(s <= 0 for s in at):
            raise ConfigError(f"{keys_name}.max_train_seconds={limit}, {keys_name}.snapshot_at_seconds={at}: "
                              "use positive seconds (null / [] for none).")
        return cls(max_seconds=None if limit is None else float(limit), snapshot_at=at)

    @property
    def has_targets(self) -> bool:
        """Whether the clock acts on the run (then it must be exact: GPU work is waited for, ranks agree)."""
        return self.max_seconds is not None or bool(self.snapshot_at)

    def start(self) -> None:
        self._t0 = now()

    def stop(self) -> float:
        """End a timed interval; returns the training seconds so far."""
        if self._t0 is not None:
            self.elapsed += now() - self._t0
            self._t0 = None
        return self.elapsed

    def due(self) -> list[float]:
        """Snapshot times crossed and not yet taken (each fires once, also across resumes)."""
        return [s for s in self.snapshot_at if self.elapsed >= s and snapshot_name(s) not in self.taken]

    def over_budget(self) -> bool:
        return self.max_seconds is not None and self.elapsed >= self.max_seconds

    def agree(self, accelerator) -> None:
        """All ranks take the slowest rank's clock, so they stop and snapshot after the same step."""
        if accelerator.num_processes > 1:
            t = torch.tensor([self.elapsed], dtype=torch.float64, device=accelerator.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            self.elapsed = float(t.item())

    def state(self) -> dict:
        """The checkpoint's trainer-state entries."""
        return {"train_seconds": self.elapsed, "snapshots": dict(self.taken)}

    def restore(self, state: dict) -> None:
        self.elapsed = float(state.get("train_seconds", 0.0))
        self.taken = {str(k): int(v) for k, v in (state.get("snapshots") or {}).items()}
