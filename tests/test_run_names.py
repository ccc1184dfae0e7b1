"""Run dir names: derived from the overrides (the same command finds the same run), pasteable unquoted into a
shell and into a Hydra override, and an old-style run dir gets a one-line way to move it."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from ldm_users.cli.train import refuse_to_split_an_old_run
from ldm_users.config import MAX_NAME, run_dir_name
from ldm_users.errors import ConfigError
from ldm_users.runtime import output_dir
from tests.helpers import compose, hydra_job

SAFE = re.compile(r"[A-Za-z0-9_.+-]+")


def _run_dir(*overrides: str) -> Path:
    """Where `ldm-train <overrides>` puts its run (hydra.run.dir, resolved by Hydra's runtime)."""
    with hydra_job(None, *overrides):
        return output_dir()


@pytest.mark.parametrize("overrides, name", [
    (["experiment=smoke", "model=unet_tiny"], "experiment-smoke+model-unet_tiny"),
    (["model=unet_tiny", "experiment=smoke", "logger=none", "train.resume=never"], "experiment-smoke+model-unet_tiny"),
    (["train.lr=2e-4", "data=folder", "data.data_dir=/data/my users"], "data.data_dir-_data_my_users+data-folder+train.lr-2e-4"),
    (["model.denoiser.block_out_channels=[32,64]", "+note=a:b"], "+note-a_b+model.denoiser.block_out_channels-_32_64_"),
    ([], "default"),
])
def test_run_dir_names_need_no_quoting_in_a_shell_or_an_override(overrides, name):
    run_dir = _run_dir(*overrides)
    assert run_dir.name == name and SAFE.fullmatch(run_dir.name)
    assert shlex.quote(str(run_dir)) == str(run_dir)  # nothing a shell would need quoted
    # The exact path, pasted into an override: Hydra's grammar takes it as it is.
    assert compose(f"model_path={run_dir}", config_name="sample").model_path == str(run_dir)
    assert compose(f"export_path={run_dir}/export", config_name="eval").export_path == f"{run_dir}/export"


def test_long_names_stay_distinct_and_under_the_file_name_limit():
    a, b = run_dir_name("x" * 300 + "a"), run_dir_name("x" * 300 + "b")
    assert len(a) == len(b) == MAX_NAME and a != b and SAFE.fullmatch(a)
    assert run_dir_name("x" * 300 + "a") == a  # deterministic: the same command finds the same run


def test_an_old_style_run_dir_gets_a_one_line_move(tmp_path):
    runs = tmp_path / "runs"
    old = runs / "experiment=smoke,model=unet_tiny"
    (old / "ldm" / "checkpoints").mkdir(parents=True)
    new = runs / "experiment-smoke+model-unet_tiny"
    (new / ".hydra").mkdir(parents=True)  # what Hydra wrote before the job started
    with hydra_job(new, "experiment=smoke", "model=unet_tiny", "logger=none") as cfg:
        with pytest.raises(ConfigError) as err:
            refuse_to_split_an_old_run(cfg, new)
        message = str(err.value)
        assert "\n" not in message and f"mv {shlex.quote(str(old))} {new}" in message
        command = message.split("Move it: ", 1)[1].split("  (", 1)[0]
        subprocess.run(["bash", "-c", command], check=True)
        assert (new / "ldm" / "checkpoints").is_dir() and not old.exists()
        refuse_to_split_an_old_run(cfg, new)  # moved: nothing to say
    with hydra_job(new, "experiment=smoke", "model=unet_tiny", "train.resume=never") as cfg:
        old.mkdir()
        (new / "ldm").rename(tmp_path / "elsewhere")
        refuse_to_split_an_old_run(cfg, new)  # starting over on purpose
