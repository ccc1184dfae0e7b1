"""The stage runner both training stages use: resume, the step loop, logging, sample grids, checkpoints, stops.

A stage hands over its step (training/steps.py) and its hooks; the runner does the rest the same way for both:

- resume from the latest complete checkpoint (`train.resume`), setting damaged ones aside and refusing one of
  another user map or model;
- every step: the step object, then bad-step bookkeeping (a skipped step counts towards `max_bad_steps` in a
  row and stays out of the logged means);
- every `log_interval` steps: means over the good steps since the last log (loss, grad norm), LR, images/s,
  epoch, skipped steps, peak GPU memory, plus the stage's own terms; under `<stage name>/` in the tracker (`vae/*`, `ldm/*`);
- every `sample_interval` steps on the main process: the stage's `sample` hook (a grid);
- every `save_interval` steps: a checkpoint (rotated to `checkpoints_total_limit`), with the stage's files;
- `stop_at_step` and SIGTERM/SIGINT: checkpoint at this step and stop (a signal raises TrainingInterrupted);
- the training clock (training/clock.py, seconds inside the step only): the stage's `snapshot` hook when it first
  crosses each `snapshot_at_seconds`, and at `max_train_seconds` the end of the stage (as if its last step).

The cadence keys are read from the stage's own config node (`cfg.vae_train` or `cfg.train`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig

from ldm_users.progress import progress, show_postfix
from ldm_users.training import checkpoint as ckpt
from ldm_users.training.clock import TrainingClock, snapshot_name
from ldm_users.training.common import DataOrder
from ldm_users.training.nonfinite import BadStepCounter
from ldm_users.training.resume import restore, write_run_meta
from ldm_users.training.signals import interrupted, stop_requested
from ldm_users.training.steps import StepResult

log = logging.getLogger(__name__)


class StageHooks:
    """What a stage adds to the runner; every hook is optional."""

    def checkpoint_state(self) -> dict:
        """Extra trainer-state entries of a checkpoint."""
        return {}

    def write_extra(self, folder: Path) -> None:
        """Extra files of a checkpoint (written into its temporary folder, main process only)."""

    def resumed(self, folder: Path) -> None:
        """After accelerate restored its state from `folder` (e.g. the EMA weights)."""

    def sample(self, step: int) -> None:
        """Every sample_interval steps, on the main process."""

    def metrics(self, result: StepResult) -> dict:
        """Extra logged values (without the stage prefix) from the latest step."""
        return {}

    def snapshot(self, name: str, record: dict) -> None:
        """When the training clock first crosses one of snapshot_at_seconds (`name`: e.g. 30s), on the main
        process; `record`: the step, training seconds and images seen at that point."""


@dataclass
class Stage:
    name: str                 # "vae" | "ldm": metric prefix, checkpoint state, progress bar, resume
    label: str                # "VAE" | "LDM": log lines and error messages
    keys: DictConfig          # cfg.vae_train | cfg.train: the cadence keys
    keys_name: str            # "vae_train" | "train": how messages name those keys
    stage_dir: Path           # <run>/<name>
    total_steps: int
    batch: int                # images per micro-batch per process
    step: Callable[[int], StepResult]
    lr_scheduler: object
    order: DataOrder
    lr: float                 # the configured (peak) learning rate, for the opening log line
    hooks: StageHooks = field(default_factory=StageHooks)
    time_first_step: bool = False  # log how long the first step took (torch.compile compiles in it)


class StageRunner:
    def __init__(self, stage: Stage, cfg: DictConfig, users: list[str], accelerator, tracker):
        self.stage, self.cfg, self.users, self.accelerator, self.tracker = stage, cfg, users, accelerator, tracker
        self.device = accelerator.device
        self.images_per_step = stage.batch * accelerator.gradient_accumulation_steps * accelerator.num_processes
        self.bad = BadStepCounter(stage.keys.max_bad_steps, stage.label, f"{stage.keys_name}.max_bad_steps")
        self.last_checkpoint: Path | None = None
        self.last_loss = self.last_rate = float("nan")
        self.first_step_seconds: float | None = None
        self.trained_steps = 0
        self.clock = TrainingClock.from_cfg(stage.keys, stage.keys_name)
        self.end_step = stage.total_steps  # the last step: earlier when max_train_seconds ends the stage

    @property
    def checkpoints(self) -> Path:
        return self.stage.stage_dir / "checkpoints"

    def resume(self) -> int:
        """Restore the latest (or the given) checkpoint of this stage; returns the step to start at."""
        stage = self.stage

        def load(folder: Path) -> dict:  # all of it: a damaged EMA file makes the checkpoint damaged too
            state = ckpt.load_checkpoint(self.accelerator, folder)
            stage.hooks.resumed(folder)
            return state

        found = restore(self.cfg, self.checkpoints, self.users, stage.name, stage.label, load, self.accelerator)
        if found is None:
            return 0
        self.last_checkpoint, state = found
        start = state["step"]
        self.clock.restore(state)  # the training clock goes on from where it was saved
        log.info("%s: resumed from %s at step %d", stage.label, self.last_checkpoint, start)
        return start

    def save(self, step: int) -> Path:
        stage = self.stage

        def extra(folder: Path) -> None:
            write_run_meta(folder, self.cfg, self.users, stage=stage.name)
            stage.hooks.write_extra(folder)

        state = {"stage": stage.name, "epoch": stage.order.epoch_of(step * self.images_per_step),
                 **self.clock.state(), **stage.hooks.checkpoint_state()}
        self.last_checkpoint = ckpt.save_checkpoint(self.accelerator, self.checkpoints, step, state,
                                                    write_extra=extra,
                                                    total_limit=int(stage.keys.checkpoints_total_limit))
        return self.last_checkpoint

    def save_final(self) -> None:
        """The checkpoint at the last step, unless this run trained nothing and one exists already."""
        if self.trained_steps or ckpt.latest_checkpoint(self.checkpoints) is None:
            self.save(self.end_step)

    def run(self, start: int) -> bool:
        """Train from `start` to the end (the last step, or max_train_seconds of training time); False when stopped
        on purpose at stop_at_step (already checkpointed)."""
        stage, keys = self.stage, self.stage.keys
        steps = stage.total_steps
        if self.clock.over_budget():  # resumed after the time budget ended it: only the final save and export
            self.trained_steps, self.end_step = 0, start
            return True
        accum, world = self.accelerator.gradient_accumulation_steps, self.accelerator.num_processes
        log.info("%s: steps %d to %d, global batch %d (%d per device x %d accumulation x %d process(es)), lr %.3g",
                 stage.label, start, steps, self.images_per_step, stage.batch, accum, world, stage.lr)
        self.trained_steps = steps - start
        self._reset_window()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        stop_at = int(keys.stop_at_step) if keys.get("stop_at_step") else None
        bar = progress(range(start, steps), initial=start, total=steps, desc=stage.name,
                       disable=not self.accelerator.is_main_process)
        for step in bar:
            result = self._timed_step(step, first=step == start)
            done = step + 1
            self._account(done, result)
            out_of_time = self._clock_work(done)
            if done % int(keys.log_interval) == 0 or done == steps or out_of_time:
                self._log(done, result, bar)
            if self.accelerator.is_main_process and done % int(keys.sample_interval) == 0:
                stage.hooks.sample(done)
            if out_of_time:  # ends the stage as its last step would: the caller saves the final checkpoint
                self.trained_steps, self.end_step = done - start, done
                log.info("%s: %.1f s of training time reached %s.max_train_seconds=%g at step %d.", stage.label,
                         self.clock.elapsed, stage.keys_name, self.clock.max_seconds, done)
                return True
            if done % int(keys.save_interval) == 0 and done < steps:
                self.save(done)
            if stop_at is not None and done >= stop_at and done < steps:
                # A planned interruption (time-sliced or preemptible jobs): checkpoint, then stop as a kill would.
                self._save_unless_saved(done)
                log.info("%s: stopped at step %d as %s.stop_at_step asks; rerun the same command to resume.",
                         stage.label, done, stage.keys_name)
                return False
            signum = stop_requested(self.accelerator)  # SIGTERM/SIGINT: checkpoint and stop, all ranks here
            if signum and done < steps:
                self._save_unless_saved(done)
                raise interrupted(signum, f"after {stage.label} step {done} of {steps}; saved {self.last_checkpoint}")
        return True

    def _timed_step(self, step: int, first: bool) -> StepResult:
        """The step, on the training clock (exact when time targets act on it: the GPU's work is waited for)."""
        timed_first = first and self.stage.time_first_step
        exact = (timed_first or self.clock.has_targets) and self.device.type == "cuda"
        t0 = time.perf_counter()
        self.clock.start()
        result = self.stage.step(step)
        if exact:
            torch.cuda.synchronize(self.device)
        self.clock.stop()
        if timed_first:
            self.first_step_seconds = time.perf_counter() - t0
            log.info("%s: first (compiling) step took %.1f s", self.stage.label, self.first_step_seconds)
        return result

    def _clock_work(self, done: int) -> bool:
        """Snapshots the training clock has crossed (after this step); True when the time budget is spent."""
        if not self.clock.has_targets:
            return False
        self.clock.agree(self.accelerator)
        for seconds in self.clock.due():
            name = snapshot_name(seconds)
            if self.accelerator.is_main_process:
                self.stage.hooks.snapshot(name, {"step": done, "train_seconds": self.clock.elapsed,
                                                 "images_seen": done * self.images_per_step})
            self.clock.taken[name] = done
            self.accelerator.wait_for_everyone()
        return self.clock.over_budget() and done < self.stage.total_steps

    def _save_unless_saved(self, done: int) -> None:
        if done % int(self.stage.keys.save_interval):
            self.save(done)

    def _reset_window(self) -> None:
        self.running_loss = torch.zeros((), device=self.device)
        self.running_norm = torch.zeros((), device=self.device)
        self.good_steps, self.images_since_log, self.t_log = 0, 0, time.perf_counter()

    def _account(self, done: int, result: StepResult) -> None:
        """Bad-step bookkeeping; a skipped step (not applied to the weights) stays out of the logged means."""
        self.images_since_log += self.images_per_step
        if result.skipped:  # K in a row stop the run
            self.bad.bad(done, result.last_loss.item(), self.last_checkpoint)
            return
        self.bad.good()
        self.good_steps += 1
        self.running_loss += result.loss
        self.running_norm += result.grad_norm.detach().float()

    def _log(self, done: int, result: StepResult, bar) -> None:
        good = self.good_steps
        mean_loss = self.accelerator.reduce(self.running_loss, "mean").item() / good if good else float("nan")
        mean_norm = self.running_norm.item() / good if good else float("nan")
        rate = self.images_since_log / max(time.perf_counter() - self.t_log, 1e-9)
        lr = self.stage.lr_scheduler.get_last_lr()[0]
        values = {"loss": mean_loss, "lr": lr, "grad_norm": mean_norm, "images_per_sec": rate,
                  "epoch": self.stage.order.epoch_of(done * self.images_per_step), "skipped_steps": self.bad.total}
        if self.device.type == "cuda":
            values["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        values.update({k: float(v) for k, v in self.stage.hooks.metrics(result).items()})
        show_postfix(bar, loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
        self.tracker.log({f"{self.stage.name}/{k}": v for k, v in values.items()}, step=done)
        self.last_loss, self.last_rate = mean_loss, rate
        self._reset_window()
