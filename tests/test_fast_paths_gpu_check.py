"""experiments/gpu_check.sh cannot rot: its dry mode composes every command it would run on a GPU."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from ldm_users.perf.gpu_check import BUDGET_S, SPEED_MODELS, checks, main
from tests.helpers import REPO


def test_gpu_check_dry_run_composes_every_command():
    env = {**os.environ, "PYTHON": str(REPO / ".venv" / "bin" / "python")} if (REPO / ".venv").exists() else None
    proc = subprocess.run(["bash", str(REPO / "experiments" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("composes")]
    assert len(lines) == len(checks(REPO / "outputs")) == len(SPEED_MODELS) + 3
    for model in SPEED_MODELS:
        assert any(f"ldm-bench model={model} hardware=h100_80gb" in line for line in lines), model
    assert any("bench.mode=memory" in line for line in lines)
    assert any("hardware=p100_16gb" in line and "train.max_steps=50" in line for line in lines)
    assert any("experiment=small_data_16gb" in line for line in lines)
    assert f"of {BUDGET_S} s" in proc.stdout and BUDGET_S <= 8 * 60


@pytest.mark.skipif(torch.cuda.is_available(), reason="without a GPU")
def test_gpu_check_refuses_to_run_without_a_gpu_and_says_so(tmp_path):
    assert main(["--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")]) == 1
    assert not list(tmp_path.glob("gpu_check_*"))
