"""One data-parallel training over all the tasks of a submitit job (hydra/launcher=slurm|local, several tasks).

torchrun and `accelerate launch` tell each process its place through RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT, and everything downstream (accelerate, main-process-only writes, the rank-reduced stop flag,
`runtime.rank()`) reads those. A submitit job with tasks_per_node > 1 or nodes > 1 starts the Hydra job function
once per task and describes the tasks its own way (`submitit.JobEnvironment`: SLURM_PROCID, SLURM_LOCALID, ...
on SLURM, SUBMITIT_LOCAL_* with the local executor). `launcher_job()` translates the one into the other and
initialises torch.distributed (NCCL on GPUs, gloo on the CPU) before accelerate starts, so such a job behaves
exactly as the same training under torchrun. Every task runs the same Hydra job (same overrides, same sweep
dir resolved once by the submitting process), so they all compute the same run dir. Preemption and time limits
become a checkpoint at the same step on every rank, then submitit's requeue (`launcher_job`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
from omegaconf import DictConfig, open_dict

from ldm_users.errors import ConfigError
from ldm_users.training.common import global_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tasks:
    """This process's place among the tasks of its job, as torch.distributed's env:// initialisation wants it."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int

    def environ(self) -> dict[str, str]:
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def master_port(job_id: str) -> int:
    """A port derived from the job id: the same on every task of a job (and after a requeue), and different for
    the jobs of a sweep that run at once on one node (as submitit's TorchDistributedEnvironment picks it)."""
    return random.Random(str(job_id)).randint(20000, 60000)


def launcher_tasks(env) -> Tasks | None:
    """This process's place among the tasks of the submitit job `env` (a submitit.JobEnvironment); None when it
    is the job's only task or was started by torchrun/accelerate launch (which set the variables themselves)."""
    if "WORLD_SIZE" in os.environ or env.num_tasks <= 1:
        return None
    # One node: the loopback address always resolves (a container's host name may not); several: the first node.
    addr = "127.0.0.1" if env.num_nodes == 1 else env.hostnames[0]
    port = int(os.environ.get("MASTER_PORT") or master_port(env.job_id))
    return Tasks(rank=env.global_rank, local_rank=env.local_rank, world_size=env.num_tasks,
                 local_world_size=env.num_tasks // env.num_nodes, master_addr=addr, master_port=port)


def _check_gpus(tasks: Tasks) -> None:
    visible = torch.cuda.device_count()
    if tasks.local_rank >= visible:
        raise ConfigError(f"{tasks.local_world_size} tasks per node but task {tasks.rank} sees {visible} GPU(s): "
                          f"set hydra.launcher.gpus_per_node={tasks.local_world_size} (one GPU per task; every task "
                          "sees the node's GPUs and takes the one of its local rank) and leave gpus_per_task unset, "
                          "or use hydra/launcher=slurm_4gpu.")


@contextlib.contextmanager
def _process_group(tasks: Tasks | None) -> Iterator[None]:
    """torch.distributed over the job's tasks, set up as torchrun would (env vars, then the group), and left after."""
    if tasks is None:
        yield
        return
    os.environ.update(tasks.environ())
    created = not torch.distributed.is_initialized()
    if created:
        if torch.cuda.is_available():
            _check_gpus(tasks)
            torch.cuda.set_device(tasks.local_rank)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
        log.info("rank %d of %d (local rank %d): torch.distributed %s via %s:%d", tasks.rank, tasks.world_size,
                 tasks.local_rank, backend, tasks.master_addr, tasks.master_port)
    try:
        yield
    finally:
        if created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def launcher_job() -> Iterator[Tasks | None]:
    """Around one Hydra job. Inside a submitit job (hydra/launcher=slurm|local): join the job's other tasks in one
    process group, and make submitit's preemption/time-limit signal (USR2, sent `signal_delay_s` before the limit)
    a checkpoint-and-stop like SIGTERM, on every rank at the same step; then hand the stop to submitit, which
    requeues the job, and the rerun resumes from that checkpoint. Elsewhere (torchrun, plain runs) nothing changes.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        yield None
        return
    import submitit

    from ldm_users.training.signals import TrainingInterrupted, also_stop_on

    env = submitit.JobEnvironment()
    preempt = getattr(signal, "SIG" + env.USR_SIG)
    tasks = launcher_tasks(env)
    with _process_group(tasks), also_stop_on(preempt):
        try:
            yield tasks
        except TrainingInterrupted as stop:
            requeue = signal.getsignal(preempt)  # submitit's handler again, now that the stage has ended
            if stop.signum == preempt and callable(requeue):
                if env.global_rank == 0:  # it exits in submitit's handler, before the entry point could say this
                    print(f"{stop} submitit requeues the job.", file=sys.stderr, flush=True)
                requeue(preempt, None)  # the main task requeues the job and exits; the others end as stopped
            raise


def bind_global_batch(cfg: DictConfig, accelerator) -> int:
    """Record the global batch (per-device batch x accumulation x processes) and the world size in the config,
    where the tracker (W&B config, metrics.jsonl) and the checkpoints take them from; say it once in the log."""
    hw = cfg.hardware
    batch, accum, world = int(hw.batch_size), accelerator.gradient_accumulation_steps, accelerator.num_processes
    total = global_batch(cfg, accelerator)
    with open_dict(cfg):
        hw.world_size = world
        hw.global_batch_size = total
    if accelerator.is_main_process:
        log.info("global batch %d = %d per device x %d accumulation step(s) x %d process(es)", total, batch, accum,
                 world)
    return total
