"""Damaged checkpoints: told from their files' headers and sizes, set aside (never deleted) by train.resume=auto,
which resumes from the newest intact one (bit-exact once the lost steps are replayed), refused with the exact
override when named by train.resume=PATH, and never the reason rotation deletes the last intact checkpoint."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm_users.cli.train import run
from ldm_users.errors import CheckpointError
from ldm_users.training import checkpoint as ckpt
from ldm_users.training.resume import restore
from tests.helpers import hydra_job
from tests.test_reliability import (STEPS, _state_dicts_equal, _tiny_accelerator, assert_same_final_state,
                                    run_args)


def _save_steps(root: Path, steps: int):
    """A tiny model checkpointed after each of `steps` changes; returns the accelerator, model and checkpoints."""
    acc, model = _tiny_accelerator()
    found = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.weight.add_(1.0)
        found.append(ckpt.save_checkpoint(acc, root, step, {"stage": "ldm"}))
    return acc, model, found


def _truncate(path: Path) -> None:
    """Cut the end off, as an interrupted copy or a failing disk would (the header stays readable)."""
    path.write_bytes(path.read_bytes()[:-8])


def _bad_optimizer(checkpoint: Path) -> None:
    """A whole torch file that does not fit the optimizer: only a full load finds it."""
    torch.save({"state": {}, "param_groups": []}, checkpoint / "optimizer.bin")


def _restore(acc, root: Path, resume: str = "auto"):
    cfg = OmegaConf.create({"train": {"resume": resume}})
    return restore(cfg, root, [], "ldm", "LDM", lambda c: ckpt.load_checkpoint(acc, c), acc)


def test_damage_is_told_from_headers_and_sizes(tmp_path):
    acc, _, (good,) = _save_steps(tmp_path / "checkpoints", 1)
    assert ckpt.damage(good) is None
    cases = {
        "model.safetensors is truncated: ": lambda c: _truncate(c / "model.safetensors"),
        "model.safetensors is damaged: ": lambda c: (c / "model.safetensors").open("ab").write(b"\0" * 7),
        "model.safetensors is missing": lambda c: (c / "model.safetensors").unlink(),
        "optimizer.bin is truncated or not a torch file": lambda c: _truncate(c / "optimizer.bin"),
        "trainer_state.json is truncated or not JSON": lambda c: _truncate(c / ckpt.STATE_FILE),
    }
    for i, (reason, spoil) in enumerate(cases.items()):
        copy = tmp_path / f"case{i}" / good.name
        shutil.copytree(good, copy)
        spoil(copy)
        assert ckpt.damage(copy).startswith(reason), ckpt.damage(copy)
        with pytest.raises(ckpt.DamagedCheckpoint) as err:
            ckpt.load_checkpoint(acc, copy)
        assert err.value.reason.startswith(reason)


def test_auto_resume_sets_damaged_ones_aside_and_loads_the_newest_intact(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    acc, model, found = _save_steps(root, 4)
    at_step_2 = torch.load(found[1] / "optimizer.bin", weights_only=True)
    _truncate(found[3] / "model.safetensors")
    _bad_optimizer(found[2])  # passes the header check, fails the full load (after the weights loaded)
    with torch.no_grad():
        model.weight.zero_()
    caplog.set_level(logging.WARNING)
    checkpoint, state = _restore(acc, root)
    assert checkpoint == found[1] and state["step"] == 2
    assert torch.equal(model.weight, ckpt.load_tensors(found[1] / "model.safetensors")["weight"])
    _state_dicts_equal(acc._optimizers[0].state_dict(), at_step_2, "optimizer")
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-0000001", "checkpoint-0000002",
                                                      "checkpoint-0000003.damaged", "checkpoint-0000004.damaged"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    for part in ("LDM: set aside damaged checkpoint(s) as *.damaged", "checkpoint-0000004 (model.safetensors is "
                 "truncated", "checkpoint-0000003 (ValueError", "resuming from checkpoint-0000002"):
        assert part in warnings[0], warnings[0]


def test_auto_resume_with_no_intact_checkpoint(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    acc, _, found = _save_steps(root, 2)
    for c in found:
        _truncate(c / "model.safetensors")
    assert _restore(acc, root) is None  # nothing was loaded: a fresh start
    assert "no intact checkpoint is left: training starts from step 0" in caplog.text
    assert [p.name for p in root.iterdir() if p.name.endswith(".damaged")] and not ckpt.list_checkpoints(root)

    # A failed full load may have changed the model: no silent fresh start from those weights.
    acc, _, (only,) = _save_steps(tmp_path / "other", 1)
    _bad_optimizer(only)
    with pytest.raises(CheckpointError, match="no checkpoint under .* loads.*Run the same command again"):
        _restore(acc, tmp_path / "other")
    assert ckpt.list_checkpoints(tmp_path / "other") == []


def test_explicit_damaged_checkpoint_is_refused_with_the_exact_override(tmp_path):
    root = tmp_path / "checkpoints"
    acc, _, found = _save_steps(root, 3)
    _truncate(found[2] / "model.safetensors")
    _truncate(found[1] / "optimizer.bin")
    with pytest.raises(CheckpointError) as err:
        _restore(acc, root, resume=str(found[2]))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"cannot load checkpoint {found[2]}: model.safetensors is "
                                                      "truncated")
    assert message.endswith(f"rerun with train.resume={found[0]}")  # checkpoint 2 is damaged too: never offered
    assert ckpt.list_checkpoints(root) == found  # an explicit choice sets nothing aside

    _bad_optimizer(found[0])  # whole files that do not load: the full load's error, and no override left
    with pytest.raises(CheckpointError, match=r"ValueError.*No intact checkpoint is beside it: start over with "
                                              r"train.resume=never"):
        _restore(acc, root, resume=str(found[0]))
    with pytest.raises(CheckpointError, match=r"no complete checkpoint there .*is checkpoint-0000001: rerun with"):
        _restore(acc, root, resume=str(root / "checkpoint-0000009"))  # whole files offered: told by headers only


def test_rotation_keeps_the_newest_intact_checkpoint_behind_damaged_ones(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    acc, _, found = _save_steps(root, 4)
    for c in found[2:]:
        _truncate(c / "model.safetensors")
    ckpt.rotate(root, 2)
    assert ckpt.list_checkpoints(root) == found[1:]  # checkpoint 2 outlives the limit: 3 and 4 are damaged
    assert f"kept {found[1]} beyond checkpoints_total_limit=2" in caplog.text
    newest = ckpt.save_checkpoint(acc, root, 5, {"stage": "ldm"}, total_limit=2)
    assert ckpt.list_checkpoints(root) == [found[3], newest]  # an intact one is newer again: the usual limit


def _train_here(run_dir: Path, *overrides: str) -> dict:
    """The smoke run of the reliability tests, in this process (both runs compared share its thread count)."""
    with hydra_job(run_dir, *run_args(*overrides)) as cfg:
        return run(cfg)


@pytest.mark.slow
def test_damaged_latest_checkpoints_resume_from_the_previous_ones_bit_exact(tmp_path, caplog):
    """A finished run whose latest VAE and LDM checkpoints were truncated (and whose VAE and export are gone)
    resumes both stages from the checkpoints before, with one warning each, and ends bit-exact with the
    uninterrupted run. Naming the damaged one with train.resume=PATH refuses, giving the override to use."""
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    # VAE checkpoints at 2 and 4 (its last step saves vae/final instead), LDM checkpoints at 4, 8 and 12.
    vae = ("vae_train.max_steps=6", "vae_train.save_interval=2")
    _train_here(reference, *vae)
    shutil.copytree(reference, run_dir)
    damaged = {"vae": ("checkpoint-0000004", "checkpoint-0000002", 2),
               "ldm": (f"checkpoint-{STEPS:07d}", f"checkpoint-{STEPS - 4:07d}", STEPS - 4)}
    for stage, (latest, _, _) in damaged.items():
        _truncate(run_dir / stage / "checkpoints" / latest / "model.safetensors")
    shutil.rmtree(run_dir / "vae" / "final")  # the VAE stage resumes too
    shutil.rmtree(run_dir / "export")

    caplog.clear()
    caplog.set_level(logging.INFO, logger="ldm_users")
    _train_here(run_dir, *vae)
    for label, stage in (("VAE", "vae"), ("LDM", "ldm")):
        latest, previous, step = damaged[stage]
        folder = run_dir / stage / "checkpoints"
        assert caplog.text.count(f"{label}: set aside damaged checkpoint(s)") == 1, caplog.text[-3000:]
        assert f"{latest} (model.safetensors is truncated" in caplog.text
        assert f"{label}: resumed from {folder / previous} at step {step}" in caplog.text
        assert (folder / f"{latest}.damaged" / "model.safetensors").exists()  # kept for inspection
    assert_same_final_state(run_dir, reference)

    latest, previous, _ = damaged["ldm"]
    named = run_dir / "ldm" / "checkpoints" / latest
    _truncate(named / "model.safetensors")
    with pytest.raises(CheckpointError) as refused:  # ldm-train prints it as its one line, "error: <message>"
        _train_here(run_dir, *vae, f"train.resume={named}")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"cannot load checkpoint {named}: "), message
    assert message.endswith(f"rerun with train.resume={run_dir / 'ldm' / 'checkpoints' / previous}")
