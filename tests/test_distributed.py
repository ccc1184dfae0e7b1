"""Several processes per job: submitit tasks as one torch.distributed training, SLURM parameters, shared caches.

On this machine (CPU, gloo): a 2-task job of submitit's local executor against torchrun on the same config, with
a preemption (SIGUSR2, what SLURM sends before a time limit) and submitit's requeue in the middle; the sbatch
script a 2-node x 4-GPU sweep would submit (no cluster needed); two processes racing to build the same caches.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from ldm_users.errors import ConfigError, DataError
from tests.test_reliability import CHILD, TIMEOUT, _env, _state_dicts_equal
from tests.wandb_offline import inspect_summary, offline_runs

LDM_STEPS = 40  # long enough that the preemption lands mid-training however busy the machine is
# vae_train.share=false: both launchers train their own VAE, so the VAE weights are compared too (not reused).
ARGS = ["experiment=smoke", "logger=wandb", "vae_train.share=false", "vae_train.max_steps=4",
        f"train.max_steps={LDM_STEPS}", "vae_train.save_interval=2", "train.save_interval=4", "hardware.batch_size=4",
        "train.sample_interval=1000", "sampler.num_inference_steps=2", "train.grid_per_user=1",
        "vae_train.scale_samples=16"]


def _submitit_tasks(root_pid: int) -> list[int]:
    """The pids of the submitit task processes started under `root_pid` (its controller's children)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root_pid]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                if b"submitit.core._submit" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass
    return found


def _final_state(run_dir: Path) -> dict:
    final = run_dir / "ldm" / "checkpoints" / f"checkpoint-{LDM_STEPS:07d}"
    state = {rel: load_file(str(run_dir / rel)) for rel in
             ["vae/final/diffusion_pytorch_model.safetensors", "export/unet/diffusion_pytorch_model.safetensors"]}
    state.update({name: load_file(str(final / name)) for name in ("model.safetensors", "ema.safetensors")})
    state.update({name: torch.load(final / name, weights_only=True) for name in ("optimizer.bin", "scheduler.bin")})
    return state


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun and submitit's local executor, gloo")
def test_local_launcher_two_tasks_match_torchrun_and_requeue_resumes(tmp_path, session_cache):
    """`-m hydra/launcher=local hydra.launcher.tasks_per_node=2` trains ONE job as 2 ranks: one run dir, one W&B
    run per attempt recording world size 2 and the global batch; SIGUSR2 to both tasks (SLURM's warning before a
    time limit) stops them after the same step with a checkpoint, submitit requeues the job, the rerun resumes
    there; the final weights, EMA, optimizer and LR state are bit-identical to torchrun --nproc_per_node 2."""
    env = _env(session_cache, OMP_NUM_THREADS="1")
    reference = tmp_path / "torchrun"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(CHILD),
                *ARGS, f"hydra.run.dir={reference}"]
    out = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]

    sweep = tmp_path / "sweep"
    job = subprocess.Popen([sys.executable, str(CHILD), "-m", "hydra/launcher=local",
                            "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}", *ARGS],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not list(sweep.glob("0_*/ldm/checkpoints/checkpoint-0000004")):
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before LDM step 4"
            time.sleep(0.05)
        tasks = _submitit_tasks(job.pid)
        assert len(tasks) == 2, tasks
        for pid in tasks:
            os.kill(pid, signal.SIGUSR2)
        output = job.communicate(timeout=TIMEOUT)[0]
    finally:
        job.kill()
    assert job.returncode == 0, output[-3000:]

    (run_dir,) = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]  # one run dir
    logs = "".join(p.read_text(errors="replace") for p in sweep.glob(".submitit/*/*_log.*"))
    stops = re.findall(r"stopped by SIGUSR2 after LDM step (\d+) of \d+; saved (\S+)\.", logs)
    assert len(stops) == 2 and stops[0] == stops[1], logs[-4000:]  # both ranks, the same step and checkpoint
    assert Path(stops[0][1]).name == f"checkpoint-{int(stops[0][0]):07d}"
    assert "Requeued job" in logs and f"resumed from {stops[0][1]}" in logs, logs[-4000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "ok"

    _state_dicts_equal(_final_state(run_dir), _final_state(reference), "submitit vs torchrun")

    runs = offline_runs(run_dir)
    assert len(runs) == 2, runs  # one W&B run per attempt (before and after the requeue), never one per rank
    config = inspect_summary(runs[-1])["config"]
    assert config["hardware"]["world_size"] == 2 and config["hardware"]["global_batch_size"] == 8, config["hardware"]
    assert config["system"]["world_size"] == 2


# --------------------------------------------------------------------------- SLURM parameters, no cluster


def _slurm_submission(tmp_path, *overrides: str):
    """What hydra-submitit-launcher hands to submitit for these overrides: the executor and its sbatch script."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from ldm_users.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"hydra.sweep.dir={tmp_path}", "experiment=smoke"],
                      return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    seen = {}

    class Submitted(Exception):
        pass

    def map_array(executor, fn, *args):
        seen["executor"] = executor
        raise Submitted

    with mock.patch("submitit.slurm.slurm.SlurmExecutor.affinity", return_value=1), \
            mock.patch.object(submitit.AutoExecutor, "map_array", map_array), pytest.raises(Submitted):
        launcher.launch([["model=unet_tiny"], ["model=dit_tiny"]], 0)
    executor = seen["executor"]._executor
    return executor, executor._make_submission_file_text("python -u -m submitit.core._submit X", "uid")


@pytest.mark.parametrize("overrides", [
    ["hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=4",
     "hydra.launcher.gpus_per_node=4"],
    ["hydra/launcher=slurm_4gpu", "hydra.launcher.nodes=2"],
])
def test_slurm_sweep_of_2_nodes_x_4_gpus_composes_into_sbatch(tmp_path, overrides):
    executor, sbatch = _slurm_submission(tmp_path, *overrides, "hydra.launcher.partition=gpu")
    assert executor._num_tasks() == 8 and executor.max_num_timeout == 3
    for line in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--signal=USR2@120",
                 "--cpus-per-task=8", "--time=1440"]:
        assert f"#SBATCH {line}\n" in sbatch, sbatch
    assert "gpus-per-task" not in sbatch  # every task sees the node's GPUs and takes the one of its local rank
    assert "export SUBMITIT_EXECUTOR=slurm" in sbatch and "\nsrun " in sbatch


def test_each_task_reads_its_rank_from_slurm(monkeypatch):
    """Task 5 of a 2-node x 4-task SLURM array job: the torch.distributed variables every rank derives alike."""
    import submitit

    from ldm_users import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "1240", "SLURM_ARRAY_JOB_ID": "1234",
                       "SLURM_ARRAY_TASK_ID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2",
                       "SLURM_NODEID": "1", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
                       "SLURM_JOB_NODELIST": "gpu[07-08]"}.items():
        monkeypatch.setenv(key, value)
    tasks = distributed.launcher_tasks(submitit.JobEnvironment())
    assert tasks.environ() == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                               "MASTER_ADDR": "gpu07", "MASTER_PORT": str(distributed.master_port("1234_1"))}
    assert 20000 <= distributed.master_port("1234_1") <= 60000
    assert distributed.master_port("1234_1") != distributed.master_port("1234_2")  # concurrent jobs of a sweep
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.launcher_tasks(submitit.JobEnvironment()) is None  # one task: nothing to set up

    with mock.patch("torch.cuda.device_count", return_value=1), pytest.raises(ConfigError, match="gpus_per_node=4"):
        distributed._check_gpus(tasks)


# ------------------------------------------------------------------------------------------ shared caches


def _build_caches(data_root: str, cache: str, counts: str, barrier) -> None:
    """One racing process: prepare the folder dataset and encode its latents, counting decodes and encodes."""
    from ldm_users.data import folder
    from ldm_users.models.build import build_vae
    from ldm_users.training import latent_cache
    from tests.helpers import compose

    def counted(fn, what: str, delay: float):
        def wrapper(*args, **kwargs):
            with open(counts, "a") as f:
                f.write(what + "\n")
            time.sleep(delay)  # the other process arrives while this one builds
            return fn(*args, **kwargs)
        return wrapper

    folder.load_image = counted(folder.load_image, "decode", 0.02)
    torch.manual_seed(0)
    vae = build_vae(compose("experiment=smoke", "logger=none")).eval()
    vae.encode = counted(vae.encode, "encode", 0.3)
    barrier.wait()
    data = folder.prepare_folder(data_root, cache, 32, show_progress=False)
    latent_cache.load_or_encode(vae, data, cache, "cpu", batch_size=8, show_progress=False)


def test_two_processes_building_the_same_caches_build_them_once(tmp_path):
    from ldm_users.data.folder import prepare_folder
    from ldm_users.data.synthetic import generate

    root, cache, counts = generate(tmp_path / "data", 2, 8, 32, 0), tmp_path / "cache", tmp_path / "counts"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_build_caches, args=(str(root), str(cache), str(counts), barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=TIMEOUT)
    assert [p.exitcode for p in procs] == [0, 0]
    done = counts.read_text().split()
    assert done.count("decode") == 16 and done.count("encode") == 2, done  # once, not once per process
    latents = [p for p in (cache / "latents").iterdir() if p.suffix == ".npy"]
    assert len(latents) == 1 and not list(cache.rglob(".tmp-*"))
    assert len(prepare_folder(root, cache, 32, show_progress=False)) == 16


def test_caches_refuse_a_disk_too_small_naming_dir_and_bytes(tmp_path):
    from ldm_users.data.folder import prepare_folder
    from ldm_users.data.synthetic import generate

    root = generate(tmp_path / "data", 2, 3, 32, 0)
    usage = mock.Mock(free=1000)
    with mock.patch("shutil.disk_usage", return_value=usage), pytest.raises(DataError) as err:
        prepare_folder(root, tmp_path / "cache", 32, show_progress=False)
    assert f"needs 18.5 kB (18,480 bytes) in {tmp_path / 'cache' / 'prepared'}" in str(err.value)
    assert "1.0 kB free" in str(err.value) and "paths.cache_dir" in str(err.value)
    assert not (tmp_path / "cache" / "prepared").exists() or not any(
        p for p in (tmp_path / "cache" / "prepared").iterdir() if not p.name.endswith(".lock"))
