"""Reliability: kills, signals, bad data, NaNs, full disks, several processes, tampered files, tracker faults.

The kill tests run the real entry point in a subprocess and SIGKILL it, either at chosen points (through
tests/reliability_child.py, which patches one function to kill the process there) or at random times from
outside; the rerun of the same command must end with exactly (bit for bit) the weights, EMA, optimizer and LR
state of one uninterrupted run, which all of them share.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm_users.errors import CheckpointError, DataError, exit_on_user_error
from ldm_users.training import checkpoint as ckpt
from tests.helpers import REPO, compose, hydra_job

CHILD = REPO / "tests" / "reliability_child.py"
STEPS = 12
# A smaller smoke run: 12 VAE + 12 LDM steps, a checkpoint and a sample grid every 4 steps. Every run trains its
# own VAE (vae_train.share=false): these tests are about what training does, not about reusing a cached VAE.
RUN = ["experiment=smoke", "logger=none", "vae_train.share=false", f"vae_train.max_steps={STEPS}",
       f"train.max_steps={STEPS}", "vae_train.save_interval=4", "train.save_interval=4", "train.sample_interval=4",
       "train.log_interval=4", "vae_train.scale_samples=32", "sampler.num_inference_steps=4", "train.grid_per_user=1"]
TIMEOUT = 600


def run_args(*extra: str) -> list[str]:
    """RUN with `key=value` replacements and additions (Hydra refuses the same key twice)."""
    merged = dict(a.split("=", 1) for a in RUN)
    merged.update(a.split("=", 1) for a in extra)
    return [f"{k}={v}" for k, v in merged.items()]


# ----------------------------------------------------------------------------------------------- helpers


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_TEST_")}
    env.update(LDM_USERS_CACHE=str(cache), WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]), **extra)  # this checkout's code first
    return env


def _command(run_dir: Path, *overrides: str, child: bool = False) -> list[str]:
    entry = [str(CHILD)] if child else ["-m", "ldm_users.cli.train"]
    return [sys.executable, *entry, *run_args(f"hydra.run.dir={run_dir}", *overrides)]


def _launch(run_dir: Path, cache: Path, *overrides: str, fault: str | None = None, **env) -> tuple[list[str], dict]:
    """(command, environment) of a training run; with a fault or any LDM_TEST_ setting, through the fault child."""
    if fault:
        env["LDM_TEST_FAULT"] = fault
    child = any(k.startswith("LDM_TEST_") for k in env)
    return _command(run_dir, *overrides, child=child), _env(cache, **env)


def _train(run_dir: Path, cache: Path, *overrides: str, fault: str | None = None, **env) -> subprocess.CompletedProcess:
    command, environment = _launch(run_dir, cache, *overrides, fault=fault, **env)
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=TIMEOUT)


class Running:
    """A training subprocess whose stderr is collected as it comes (to kill it at a chosen moment)."""

    def __init__(self, run_dir: Path, cache: Path, *overrides: str, fault: str | None = None):
        command, env = _launch(run_dir, cache, *overrides, fault=fault)
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.err: list[bytes] = []
        fd = self.proc.stderr.fileno()  # raw reads: tqdm ends its lines with \r, not \n
        self._reader = threading.Thread(target=lambda: self.err.extend(iter(lambda: os.read(fd, 65536), b"")),
                                        daemon=True)
        self._reader.start()


    def wait_for(self, path: Path, timeout: float = TIMEOUT) -> bool:
        """Poll (every 20 ms) until path exists; False when the process ended first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if path.exists():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        raise TimeoutError(f"{path} did not appear")

    def finish(self) -> tuple[int, str]:
        code = self.proc.wait(timeout=TIMEOUT)
        self._reader.join(timeout=30)
        return code, b"".join(self.err).decode(errors="replace")


def _state_dicts_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        va, vb = a[key], b[key]
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), f"{what}: {key} differs"
        elif isinstance(va, dict):
            _state_dicts_equal(va, vb, f"{what}.{key}")
        elif isinstance(va, (list, tuple)) and va and isinstance(va[0], dict):
            for i, (x, y) in enumerate(zip(va, vb)):
                _state_dicts_equal(x, y, f"{what}.{key}[{i}]")
        else:
            assert va == vb, f"{what}: {key}: {va} != {vb}"


def assert_same_final_state(run_dir: Path, ref: Path) -> None:
    """Bit-exact: final VAE, LDM weights, EMA weights and step, optimizer and LR scheduler state, export."""
    final = f"ldm/checkpoints/checkpoint-{STEPS:07d}"
    for rel in ["vae/final/diffusion_pytorch_model.safetensors", f"{final}/model.safetensors",
                f"{final}/ema.safetensors", "export/unet/diffusion_pytorch_model.safetensors",
                "export/user_encoder/diffusion_pytorch_model.safetensors"]:
        _state_dicts_equal(load_file(str(run_dir / rel)), load_file(str(ref / rel)), rel)
    for rel in [f"{final}/optimizer.bin", f"{final}/scheduler.bin"]:
        _state_dicts_equal(torch.load(run_dir / rel, weights_only=True), torch.load(ref / rel, weights_only=True), rel)
    for rel in [f"{final}/ema_state.json", "vae/final/config.json"]:
        assert json.loads((run_dir / rel).read_text()) == json.loads((ref / rel).read_text()), rel
    sched = torch.load(run_dir / final / "scheduler.bin", weights_only=True)
    assert sched["last_epoch"] == STEPS  # the LR schedule went through every step exactly once


def assert_checkpoints_sound(run_dir: Path) -> None:
    """Every checkpoint that counts as complete has readable weights (a kill never leaves a torn one)."""
    for stage in ("vae", "ldm"):
        for c in ckpt.list_checkpoints(run_dir / stage / "checkpoints"):
            assert load_file(str(c / "model.safetensors")), c
            assert ckpt.read_state(c)["step"] == int(c.name.split("-")[1])


def _killed(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == -signal.SIGKILL, f"expected a SIGKILL, got {out.returncode}: {out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, session_cache) -> Path:
    """One uninterrupted run of RUN, shared by the kill tests (and its VAE by the others)."""
    run_dir = tmp_path_factory.mktemp("reference")
    out = _train(run_dir, session_cache)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


# ------------------------------------------------------------------------------------------ 1. kills


@pytest.mark.slow
def test_sigkill_at_chosen_points_resumes_bit_exact(reference, tmp_path):
    """Killed while writing the latent cache, while writing an LDM checkpoint and while sampling the final grid
    (after the last checkpoint, before the export): every rerun picks up the pieces; the end is bit-exact."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"  # a fresh cache: this run must encode the latents
    ldm_ckpts = run_dir / "ldm" / "checkpoints"

    # The VAE trains to the end; the latent cache is killed halfway through its write.
    _killed(_train(run_dir, cache, fault="ldm_users.training.latent_cache:_encode:1:truncate"))
    latents = [p for p in (cache / "latents").iterdir() if not p.name.endswith(".lock")]
    assert latents and all(p.name.startswith(".tmp-") for p in latents), latents  # never under the real name

    # The cache is encoded again; LDM checkpoint 8 is killed after its weights, before its state file: a torn
    # folder that must not count.
    _killed(_train(run_dir, cache, fault="ldm_users.training.checkpoint:_write_json:2:kill"))
    assert ckpt.latest_checkpoint(ldm_ckpts).name == "checkpoint-0000004"
    torn = ldm_ckpts / ".tmp-checkpoint-0000008"
    assert (torn / "model.safetensors").exists() and not (torn / ckpt.STATE_FILE).exists()

    # Resumed from checkpoint 4 (grids at 8 and 12), killed while sampling the final grid: after the final
    # checkpoint, before the export. The rerun then only samples and exports.
    _killed(_train(run_dir, cache, fault="ldm_users.training.ldm_stage:user_rows_grid:3:kill"))
    assert ckpt.latest_checkpoint(ldm_ckpts).name == f"checkpoint-{STEPS:07d}"
    assert not torn.exists()  # the next save cleaned up the torn folder
    assert not (run_dir / "export").exists()
    assert_checkpoints_sound(run_dir)

    out = _train(run_dir, cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_final_state(run_dir, reference)


@pytest.mark.slow
def test_signals_checkpoint_and_random_sigkills_resume_bit_exact(reference, tmp_path, session_cache):
    """SIGINT during the VAE and SIGTERM during the LDM save a checkpoint and exit cleanly (128 + signal);
    SIGKILLs at random moments of each training loop (a step, a checkpoint, a grid, the export) lose at most the
    steps since the last checkpoint; the end is bit-exact."""
    run_dir = tmp_path / "run"
    rng = random.Random(0)  # moments spread over the loop, the same in every run (a failure can be replayed)
    delays = [round(rng.uniform(0.0, 0.4), 3) for _ in range(2)]

    def killed_at_random(loop_fn: str, delay: float) -> None:
        # SIGKILL from a timer thread, `delay` seconds after the loop's first step began: asynchronous to the
        # training thread like an external kill, but always inside the training window however busy the CPU.
        out = _train(run_dir, session_cache, fault=f"{loop_fn}:1:kill-in={delay}")
        _killed(out)
        assert_checkpoints_sound(run_dir)
        print(f"SIGKILL {delay} s into {loop_fn}:", *(ckpt.latest_checkpoint(run_dir / s / "checkpoints")
                                                     for s in ("vae", "ldm")))  # shown with -s or on failure

    job = Running(run_dir, session_cache)
    assert job.wait_for(run_dir / "vae" / "checkpoints" / "checkpoint-0000004"), job.finish()[1][-3000:]
    job.proc.send_signal(signal.SIGINT)
    code, err = job.finish()
    assert code == 128 + signal.SIGINT, err[-3000:]
    assert "stopped by SIGINT after VAE step" in err and "Traceback" not in err, err[-3000:]
    latest = ckpt.latest_checkpoint(run_dir / "vae" / "checkpoints")
    assert f"saved {latest}" in err  # the checkpoint of the step it stopped at, not only the periodic one

    killed_at_random("ldm_users.training.steps:VAEWithLoss.forward", delays[0])

    job = Running(run_dir, session_cache)
    assert job.wait_for(run_dir / "ldm" / "checkpoints" / "checkpoint-0000004"), job.finish()[1][-3000:]
    job.proc.send_signal(signal.SIGTERM)
    code, err = job.finish()
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM after LDM step" in err and "Traceback" not in err, err[-3000:]
    latest = ckpt.latest_checkpoint(run_dir / "ldm" / "checkpoints")
    assert f"saved {latest}" in err

    killed_at_random("ldm_users.training.steps:LdmTrainStep.__call__", delays[1])

    out = _train(run_dir, session_cache)
    assert out.returncode == 0, f"random SIGKILL delays {delays}: {out.stderr[-3000:]}"
    assert_same_final_state(run_dir, reference)


def test_partial_latent_cache_is_rebuilt_never_read(tmp_path, caplog):
    from ldm_users.data.folder import prepare_folder
    from ldm_users.data.synthetic import generate
    from ldm_users.models.build import build_vae
    from ldm_users.training import latent_cache

    cfg = compose("experiment=smoke", "logger=none")
    data = prepare_folder(generate(tmp_path / "data", 2, 3, 32, 0), tmp_path / "cache", 32, show_progress=False)
    torch.manual_seed(0)
    vae = build_vae(cfg).eval()
    good = latent_cache.load_or_encode(vae, data, tmp_path / "cache", "cpu", show_progress=False)
    good = latent_cache.LatentCache(good.mean.clone(), good.std.clone(), good.labels.clone(), good.path)
    path, full = good.path, good.path.read_bytes()

    def put(content: bytes) -> None:  # a new file under the name (rewriting in place would break live mmaps)
        tmp = path.with_name("torn")
        tmp.write_bytes(content)
        os.replace(tmp, path)

    for torn in (full[: len(full) // 2], full[:7], b""):  # cut in the data, in the header, empty
        put(torn)
        again = latent_cache.load_or_encode(vae, data, tmp_path / "cache", "cpu", show_progress=False)
        assert torch.equal(again.mean, good.mean) and torch.equal(again.std, good.std)
        assert path.read_bytes() == full  # rebuilt in place
    assert "unreadable" in caplog.text
    # A complete file of the wrong dataset size (e.g. another process's) is not taken either.
    np.save(path.with_name("short.npy"), np.load(path)[:2])
    os.replace(path.with_name("short.npy"), path)
    again = latent_cache.load_or_encode(vae, data, tmp_path / "cache", "cpu", show_progress=False)
    assert len(again.labels) == len(data) and "incomplete" in caplog.text


# --------------------------------------------------------------------------------------- 2. bad data


def _png_bomb(path: Path, size: int) -> None:
    """A valid 1-bit PNG of size x size black pixels: a few KB on disk, `size**2` pixels once decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" + bytes((size + 7) // 8)) * size
    header = struct.pack(">IIBBBBB", size, size, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
                     + chunk(b"IEND", b""))


def _png16(path: Path) -> None:
    arr = np.tile(np.linspace(0, 65535, 32, dtype=np.uint16), (32, 1))
    Image.fromarray(arr).save(path)  # mode I;16


def _write_corpus(root: Path) -> dict[str, str]:
    """One user folder per case that should decode, plus bad files in `alice`; returns name -> expectation."""
    (root / "alice").mkdir(parents=True)
    alice = root / "alice"
    rgb = Image.new("RGB", (40, 40), (200, 30, 30))
    rgb.save(alice / "good.png")
    rgb.save(alice / "good.jpg", quality=95)
    full_png, full_jpg = (alice / "good.png").read_bytes(), (alice / "good.jpg").read_bytes()
    (alice / "truncated.png").write_bytes(full_png[: len(full_png) // 2])
    (alice / "truncated.jpg").write_bytes(full_jpg[: len(full_jpg) // 2])
    (alice / "empty.png").write_bytes(b"")
    (alice / "text.png").write_text("this is not an image\n")
    Image.new("RGB", (1, 1), (1, 2, 3)).save(alice / "tiny.png")
    _png_bomb(alice / "bomb.png", 9000)  # 81 Mpixel of zeros in ~10 KB
    os.symlink("loop_b.png", alice / "loop_a.png")
    os.symlink("loop_a.png", alice / "loop_b.png")
    os.symlink(".", alice / "subdir_loop")  # a directory link to itself
    rgb.save(alice / ".hidden.png")
    (alice / "notes.txt").write_text("not an image extension")
    rgb.save(alice / os.fsdecode(b"caf\xe9-latin1.png"))  # a non-UTF-8 file name (surrogate-escaped)

    (root / "bob").mkdir()
    _png16(root / "bob" / "gray16.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(root / "bob" / "cmyk.jpg", quality=95)  # red in CMYK
    frames = [Image.new("RGB", (32, 32), c) for c in ((0, 0, 255), (0, 255, 0))]
    frames[0].save(root / "bob" / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.paste(1, (0, 0, 32, 16))  # top half index 1 (green), bottom half index 0, transparent
    pal.save(root / "bob" / "palette.png", transparency=0)
    # EXIF orientation 6 (display = stored rotated 90 degrees clockwise): stored left red | right blue.
    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(root / "bob" / "rotated.jpg", exif=exif, quality=95)
    return {}


def test_bad_data_corpus_is_skipped_counted_and_decoded_right(tmp_path, caplog):
    from ldm_users.data.folder import prepare_folder

    root = tmp_path / "corpus"
    _write_corpus(root)
    data = prepare_folder(root, tmp_path / "cache", 32, show_progress=False)
    assert data.users == ["alice", "bob"]
    names = {Path(p).name: i for i, p in enumerate(data.paths)}
    kept_alice = {n for n in names if data.labels[names[n]] == 0}
    assert kept_alice == {"good.png", "good.jpg", "caf\ufffd-latin1.png"}, kept_alice
    reasons = {Path(p).name: r for p, r in data.skipped}
    expected_bad = {"truncated.png", "truncated.jpg", "empty.png", "text.png", "tiny.png", "bomb.png",
                    "loop_a.png", "loop_b.png", "notes.txt"}
    assert set(reasons) == expected_bad, reasons
    assert "exceeds the limit" in reasons["bomb.png"] and "smaller than" in reasons["tiny.png"]
    assert "unreadable" in reasons["loop_a.png"] and "extension" in reasons["notes.txt"]
    assert ".hidden.png" not in names and ".hidden.png" not in reasons  # hidden files are not data
    assert f"skipped {len(expected_bad)} unusable file(s)" in caplog.text

    def img(name):
        return np.asarray(data.images[names[name]], dtype=np.int32)

    gray = img("gray16.png")
    assert abs(gray[:, 0].mean() - 0) < 6 and abs(gray[:, -1].mean() - 255) < 6  # 16-bit range, not clipped
    assert (gray[..., 0] == gray[..., 1]).all()
    r, g, b = img("cmyk.jpg").reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60, (r, g, b)  # CMYK (0,255,255,0) is red
    assert (np.abs(img("anim.gif") - [0, 0, 255]).max(axis=-1) < 10).all()  # the first frame
    pal = img("palette.png")
    assert (np.abs(pal[2] - [0, 200, 0]) < 10).all() and (pal[-2] > 245).all()  # transparent -> white
    rot = img("rotated.jpg")
    top, bottom = rot[:12].reshape(-1, 3).mean(0), rot[-12:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (top, bottom)  # rotated


def test_bad_data_policy_strict_and_empty_user(tmp_path):
    from ldm_users.data.folder import prepare_folder

    root = tmp_path / "corpus"
    _write_corpus(root)
    with pytest.raises(DataError, match=r"alice/bomb\.png: .*exceeds the limit.*set data\.strict=false"):
        prepare_folder(root, tmp_path / "cache", 32, strict=True, show_progress=False)
    (root / "carol").mkdir()
    (root / "carol" / "broken.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(DataError, match=r"user folder .*carol has no readable image"):
        prepare_folder(root, tmp_path / "cache", 32, show_progress=False)


@pytest.mark.slow
def test_training_on_bad_corpus_logs_skipped_count(reference, tmp_path):
    from ldm_users.cli.train import run

    root = tmp_path / "corpus"
    _write_corpus(root)
    with hydra_job(tmp_path / "run", "experiment=smoke", "logger=none", "data=folder", f"data.data_dir={root}",
                   "data.resolution=32", "data.num_users=null", f"vae_path={reference / 'vae' / 'final'}",
                   "train.max_steps=2", "train.sample_interval=1000", "sampler.num_inference_steps=2",
                   "train.grid_per_user=1", "export.enabled=false") as cfg:
        result = run(cfg)
    assert result["summary"]["data/skipped_files"] == 9
    assert result["summary"]["data/images"] == 8 and result["summary"]["data/users"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("summary", {}).get("data/skipped_files") == 9 for r in records)


# ------------------------------------------------------------------------------------- 3. NaN / inf


@pytest.mark.slow
def test_nan_streak_stops_with_message_and_intact_checkpoint(reference, tmp_path, session_cache):
    """Losses 6.. are NaN: steps 6, 7, 8 are skipped, the third in a row stops the run (exit 2, one line)."""
    run_dir = tmp_path / "run"
    out = _train(run_dir, session_cache, f"vae_path={reference / 'vae' / 'final'}", "train.max_bad_steps=3",
                 LDM_TEST_NAN_LOSS="6-")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    last_good = run_dir / "ldm" / "checkpoints" / "checkpoint-0000004"
    assert "error: LDM step 8: 3 optimizer steps in a row had a non-finite loss" in out.stderr
    assert f"last good checkpoint is {last_good} and is intact" in out.stderr
    assert ckpt.list_checkpoints(run_dir / "ldm" / "checkpoints") == [last_good]
    # Intact and unaffected: bit-equal to the uninterrupted reference at that step (same VAE, same steps).
    rel = "ldm/checkpoints/checkpoint-0000004/model.safetensors"
    _state_dicts_equal(load_file(str(run_dir / rel)), load_file(str(reference / rel)), rel)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_few_nan_steps_are_skipped_not_applied(reference, tmp_path, monkeypatch, stage):
    import torch.nn.functional as F

    from ldm_users.cli.train import run

    loss_fn = "l1_loss" if stage == "vae" else "mse_loss"
    real, calls = getattr(F, loss_fn), [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss * float("inf") if calls[0] in (2, 3) else loss  # inf loss -> inf/NaN gradients

    monkeypatch.setattr(F, loss_fn, poisoned)
    extra = ["stage=vae"] if stage == "vae" else [f"vae_path={reference / 'vae' / 'final'}", "export.enabled=false"]
    with hydra_job(tmp_path, *run_args("vae_train.max_steps=6", "train.max_steps=6", "train.log_interval=2",
                                        "train.sample_interval=100", "train.ema.warmup=false", *extra)) as cfg:
        result = run(cfg)
    final = tmp_path / stage / "checkpoints" / "checkpoint-0000006"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logs = [r["metrics"] for r in records if r["event"] == "log"]
    if stage == "vae":
        weights = load_file(str(tmp_path / "vae" / "final" / "diffusion_pytorch_model.safetensors"))
        assert logs[-1]["vae/skipped_steps"] == 2
    else:
        weights = load_file(str(final / "model.safetensors"))
        assert result["summary"]["ldm/skipped_steps_total"] == 2
        assert json.loads((final / "ema_state.json").read_text())["optimization_step"] == 4  # 6 - 2 skipped
        assert torch.load(final / "scheduler.bin", weights_only=True)["last_epoch"] == 4
        assert logs[0]["ldm/skipped_steps"] == 1 and np.isfinite(logs[0]["ldm/loss"])  # means skip them
    assert all(torch.isfinite(w).all() for w in weights.values())


# ---------------------------------------------------------------------------------------- 4. full disk


def _tiny_accelerator():
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    acc = Accelerator()
    model, opt, sched = acc.prepare(model, opt, sched)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return acc, model


def test_disk_full_or_unwritable_dir_is_a_clear_error_and_keeps_previous(tmp_path, monkeypatch, capsys):
    acc, model = _tiny_accelerator()
    root = tmp_path / "checkpoints"
    first = ckpt.save_checkpoint(acc, root, 1, {"stage": "ldm"})
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full_disk)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(CheckpointError, match=rf"No space left on device.*last complete checkpoint is "
                                              rf"{re.escape(str(first))} and is intact"):
        ckpt.save_checkpoint(acc, root, 2, {"stage": "ldm"})
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.list_checkpoints(root) == [first] and not list(root.glob(".tmp-*"))
    assert ckpt.load_checkpoint(acc, first)["step"] == 1
    _state_dicts_equal(model.state_dict(), saved, "restored")

    # An output dir that cannot be created (here: below a file) is the same clear error, not an OSError.
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        ckpt.save_checkpoint(acc, blocker / "checkpoints", 3, {"stage": "ldm"})

    # Any other write that meets a full disk (grids, export, caches) ends the entry point with one line.
    @exit_on_user_error
    def entry():
        raise OSError(errno.ENOSPC, "No space left on device", "/out/export/unet/x.safetensors")

    with pytest.raises(SystemExit) as exc:
        entry()
    assert exc.value.code == 2
    assert "error: No space left on device: /out/export/unet/x.safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ 5. two processes


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun with gloo, as in CI")
def test_two_processes_one_run_same_weights_and_resume(tmp_path, session_cache):
    """torchrun --nproc_per_node 2 on the CPU (gloo): one W&B run and one set of checkpoints, the same weights
    on both ranks at every checkpoint; SIGTERM to rank 1 alone stops both after the same step with a
    checkpoint; the rerun under 2 processes resumes from it."""
    run_dir, dumps = tmp_path / "run", tmp_path / "dumps"
    args = ["experiment=smoke", "logger=wandb", f"hydra.run.dir={run_dir}", "vae_train.max_steps=4",
            "train.max_steps=8", "vae_train.save_interval=2", "train.save_interval=4", "hardware.batch_size=4",
            "train.sample_interval=1000", "sampler.num_inference_steps=2", "train.grid_per_user=1",
            "vae_train.scale_samples=16"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(CHILD), *args]
    # SIGTERM to rank 1 alone, as LDM step 6 begins; rank 0 gets no signal and must stop with it.
    env = _env(session_cache, LDM_TEST_DUMP_WEIGHTS=str(dumps), OMP_NUM_THREADS="1", LDM_TEST_FAULT_RANK="1",
               LDM_TEST_FAULT="ldm_users.training.steps:LdmTrainStep.__call__:6:term")
    first = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    ldm = run_dir / "ldm" / "checkpoints"
    stopped = ckpt.latest_checkpoint(ldm)
    assert stopped is not None and stopped.name == "checkpoint-0000006", first.stderr[-4000:]
    assert first.stderr.count(f"stopped by SIGTERM after LDM step 6 of 8; saved {stopped}") == 2, first.stderr[-4000:]

    env.pop("LDM_TEST_FAULT")
    second = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"resumed from {stopped}" in second.stdout + second.stderr  # Hydra logs to stdout
    assert [c.name for c in ckpt.list_checkpoints(ldm)][-1] == "checkpoint-0000008"
    assert [c.name for c in ckpt.list_checkpoints(run_dir / "vae" / "checkpoints")] == ["checkpoint-0000002"]

    steps = sorted({p.name.split("-")[0] for p in dumps.glob("*.safetensors")})
    assert steps == ["step4", "step6", "step8"], steps
    for step in steps:
        rank0 = load_file(str(dumps / f"{step}-rank0.safetensors"))
        _state_dicts_equal(rank0, load_file(str(dumps / f"{step}-rank1.safetensors")), f"{step}: rank 0 vs 1")
    final = load_file(str(ldm / "checkpoint-0000008" / "model.safetensors"))
    assert all(torch.equal(final[k], v) for k, v in load_file(str(dumps / "step8-rank0.safetensors")).items()
               if k in final)
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # one W&B run per invocation (the first and the resumed one), never one per rank


# ----------------------------------------------------------------------------------- 6. safe loading


class _Evil:
    """Unpickling this runs code: creates the marker folder."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_tampered_or_truncated_checkpoint_fails_clearly_without_running_code(tmp_path):
    acc, _ = _tiny_accelerator()
    good = ckpt.save_checkpoint(acc, tmp_path / "checkpoints", 1, {"stage": "ldm"})
    marker = tmp_path / "pwned"

    def variant(name: str) -> Path:
        target = tmp_path / name / good.name
        shutil.copytree(good, target)
        return target

    evil_opt = variant("evil_optimizer")
    torch.save({"state": {}, "param_groups": _Evil(marker)}, evil_opt / "optimizer.bin")
    with pytest.raises(CheckpointError, match="truncated, tampered with"):
        ckpt.load_checkpoint(acc, evil_opt)

    evil_rng = variant("evil_rng")
    torch.save(_Evil(marker), evil_rng / "random_states_0.pkl")
    ckpt.load_checkpoint(acc, evil_rng)  # RNG states are optional (every step is reseeded): ignored, not run

    evil_bin = variant("pickled_weights")
    (evil_bin / "model.safetensors").unlink()
    torch.save(_Evil(marker), evil_bin / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        ckpt.load_checkpoint(acc, evil_bin)
    assert not marker.exists()

    truncated = variant("truncated")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) - 9])
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        ckpt.load_checkpoint(acc, truncated)
    ema = tmp_path / "ema.safetensors"
    ckpt.save_tensors(ema, {"w": torch.ones(8)})
    ema.write_bytes(ema.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="truncated or not safetensors"):
        ckpt.load_tensors(ema)
    assert ckpt.load_checkpoint(acc, good)["step"] == 1  # the untouched one still loads


# --------------------------------------------------------------------------------------- 7. tracking


class _FlakyRun:
    """A W&B run whose server goes away after the first log and whose disk then fills up."""

    def __init__(self, run_dir: Path):
        self.id, self.dir = "flaky", str(run_dir / "wandb" / "files")
        self.logged = 0
        self.summary = self
        self.config = self

    def _fail(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device (wandb dir)")

    def log(self, *args, **kwargs):
        self.logged += 1
        if self.logged > 1:
            raise ConnectionError("api.wandb.ai unreachable")

    def define_metric(self, *args, **kwargs):
        pass

    update = log_artifact = _fail

    def finish(self, *args, **kwargs):
        raise ConnectionError("api.wandb.ai unreachable")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["mid_run", "at_start"])
def test_tracker_faults_never_stop_training(reference, tmp_path, monkeypatch, caplog, fault):
    import wandb

    from ldm_users.cli.train import run

    def init(*args, **kwargs):
        if fault == "at_start":
            raise ConnectionError("api.wandb.ai unreachable")
        return _FlakyRun(tmp_path)

    monkeypatch.setattr(wandb, "init", init)
    with hydra_job(tmp_path, *run_args("logger=wandb", "logger.mode=online", "train.max_steps=4",
                                        "train.log_interval=1", f"vae_path={reference / 'vae' / 'final'}")) as cfg:
        result = run(cfg)
    assert Path(result["export"], "model_index.json").exists()
    assert ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "ldm" / "checkpoints"))["step"] == 4
    assert ("W&B logging failed" if fault == "mid_run" else "could not start") in caplog.text
