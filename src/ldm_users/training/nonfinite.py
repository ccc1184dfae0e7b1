"""Non-finite losses and gradients: skip the optimizer step, count it, stop after too many in a row.

A NaN or inf loss or gradient norm must never reach the weights (one such update ruins them for good). The
step is skipped instead (under fp16 the GradScaler does this itself and lowers its scale), counted in the
logs, and after `max_bad_steps` (train.* or vae_train.*) consecutive bad steps the run stops with a message
naming the step and the last good checkpoint, which was written before the trouble and stays intact.
"""

from __future__ import annotations

import logging

import torch

from ldm_users.errors import LdmUsersError

log = logging.getLogger(__name__)


class NonFiniteLossError(LdmUsersError):
    pass


def step_is_finite(accelerator, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
    """Whether the loss and the gradient norm are finite on every rank (one host sync; one small all-reduce
    with several processes, so that all ranks skip or apply the same steps and their weights stay equal)."""
    values = [loss.detach().float().reshape(())]
    if grad_norm is not None:
        values.append(torch.as_tensor(grad_norm, device=values[0].device).detach().float().reshape(()))
    check = torch.stack(values)
    if accelerator.num_processes > 1:
        check = accelerator.reduce(check, "sum")  # inf or NaN anywhere makes the sum non-finite
    return bool(torch.isfinite(check).all())


class BadStepCounter:
    """Skipped optimizer steps: the total (for the logs) and the current streak (for the stop)."""

    def __init__(self, limit: int, stage: str, key: str = "train.max_bad_steps"):
        self.limit = max(1, int(limit))
        self.stage, self.key = stage, key
        self.in_a_row = 0
        self.total = 0

    def good(self) -> None:
        self.in_a_row = 0

    def bad(self, step: int, loss: float, last_good_checkpoint) -> None:
        """Record a skipped step (1-based `step`); raises NonFiniteLossError at the limit."""
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row == 1:
            log.warning("%s step %d: non-finite loss or gradient (loss %.3g): optimizer step skipped "
                        "(%d skipped so far)", self.stage, step, loss, self.total)
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.stage} step {step}: {self.in_a_row} optimizer steps in a row had a non-finite loss or "
                f"gradient (last loss {loss}); stopping ({self.key}={self.limit}). Lower the learning "
                f"rate, check the data, or use another precision. The last good checkpoint is "
                f"{last_good_checkpoint or 'none (no checkpoint was written yet)'} and is intact.")
