"""`--help` of each app: a description, an example, and only the groups that app accepts."""

import subprocess
import sys

import pytest


def _help(module: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("module, own, foreign", [
    ("ldm_users.cli.sample", ["sampler", "model_path="], ["model ", "hardware ", "vae "]),
    ("ldm_users.cli.eval", ["sampler", "export_path="], ["model ", "vae "]),
    ("ldm_users.cli.train", ["model ", "hardware ", "experiment "], []),
])
def test_help_lists_own_groups_only_with_an_example(module, own, foreign):
    text = _help(module)
    name = module.rsplit(".", 1)[1]
    assert text.startswith(f"ldm-{name}:") and f"ldm-{name} " in text  # a description, then an example command
    groups = text.split("Groups", 1)[1]
    for word in own:
        assert word in text
    for word in foreign:
        assert f"\n    {word}" not in groups, f"{module} --help lists {word.strip()!r}, which it rejects"
