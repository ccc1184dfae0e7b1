"""Every command the entry points print runs as written: the hints are copied and pasted, so they are run verbatim
in a shell here (from the same working directory, as a user would)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HINT = re.compile(r"^\s*\$ (.+)$", re.M)  # hints are printed as shell lines: "  $ ldm-sample model_path=..."
BIN = Path(sys.executable).parent


def _shell(command: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "WANDB_MODE": "offline"}
    out = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"`{command}` failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _hints(stdout: str) -> list[str]:
    return HINT.findall(stdout)


def test_the_commands_ldm_train_eval_and_sample_print_run_verbatim(tmp_path):
    train_hints = _hints(_shell("ldm-train experiment=smoke logger=none", tmp_path))
    assert any(h.startswith("ldm-sample ") for h in train_hints) and any(h.startswith("ldm-eval ") for h in train_hints)
    for hint in train_hints:
        stdout = _shell(hint, tmp_path)
        for follow in _hints(stdout):  # what ldm-eval and ldm-sample print in turn
            _shell(follow, tmp_path)
