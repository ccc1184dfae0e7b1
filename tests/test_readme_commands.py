"""Every ldm-train / ldm-eval / ldm-sample / ldm-bench line in the READMEs' shell blocks composes as written.

Each line is taken verbatim from README.md and experiments/README.md (comments stripped); placeholders a reader
replaces (`<run>`, `...`, `/path/...`, `/data/...`) become real paths. A multirun line (-m) composes each job of its
sweep (every comma list at its first value, as the first job). Hydra's own groups (hydra/launcher, hparams_search)
are composed with the Hydra config, as the app composes them.
"""

from __future__ import annotations

import re
import shlex

import pytest

from ldm_users.compat import check_compatibility
from ldm_users.config import compose as compose_config
from tests.helpers import REPO

APPS = {"ldm-train": "config", "ldm-eval": "eval", "ldm-sample": "sample", "ldm-bench": "bench"}


def _commands() -> list[tuple[str, str]]:
    found = []
    for readme in (REPO / "README.md", REPO / "experiments" / "README.md"):
        for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                line = line.split(" #")[0].strip()
                app = line.split(" ", 1)[0]
                if app in APPS:
                    found.append((f"{readme.name}: {line}", line))
    return found


def _first_job(arg: str) -> str:
    key, _, value = arg.partition("=")
    if "," in value and not value.startswith(("[", "'", '"')):
        value = value.split(",")[0]
    return f"{key}={value}"


COMMANDS = _commands()


@pytest.mark.parametrize("where, line", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_readme_command_composes(where, line, tmp_path):
    line = (line.replace("<run>", "run").replace("=...", f"={tmp_path}")
            .replace("/path/to/users", str(tmp_path)).replace("/data/users", str(tmp_path)))
    app, *args = shlex.split(line)
    if "..." in args:
        pytest.skip("a fragment: `...` stands for the rest of a command")
    multirun = "-m" in args
    args = [_first_job(a) if multirun else a for a in args if a != "-m"]
    cfg = compose_config(args, APPS[app], return_hydra_config=True)
    if app == "ldm-train":
        assert check_compatibility(cfg, dataset_num_users=int(cfg.data.num_users or 31)) == [], where
