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


def test_the_options_help_lists_are_the_config_files():
    """The hand-written group lists of the --help texts name every option under conf/<group>/ and nothing else."""
    import re
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf"
    for help_file in (conf / "hydra" / "help").glob("*.yaml"):
        for group, options in re.findall(r"^\s{4}(model|vae|hardware|data|sampler|logger)\s{2,}(.+)$",
                                         help_file.read_text(), re.M):
            listed = {o.strip() for o in options.split("(")[0].split(",")}
            shipped = {p.stem for p in (conf / group).glob("*.yaml")}
            assert listed == shipped, f"{help_file.name}: {group} lists {sorted(listed)}, conf has {sorted(shipped)}"
