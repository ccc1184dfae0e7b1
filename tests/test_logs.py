"""What a person reads: a log file without third-party progress bars, rounded numbers, and after the evaluation an
export whose model card the Hub can read, with the evaluation's figures."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard

from ldm_users.formatting import round_sig

FAST_EVAL = ["eval.enabled=true", "eval.images_per_user=2", "sampler.num_inference_steps=4", "eval.device=cpu"]


@pytest.mark.slow
def test_a_run_logged_to_a_file_has_no_third_party_bars_and_its_card_has_the_scores(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], run_dir)  # resumes at its last step: export + evaluation only
    log_file = tmp_path / "run.log"
    with open(log_file, "w") as out:  # as `ldm-train ... > run.log 2>&1` (a SLURM .out)
        proc = subprocess.run([sys.executable, "-m", "ldm_users.cli.train", "experiment=smoke", "logger=none",
                               *FAST_EVAL, f"hydra.run.dir={run_dir}"], cwd=tmp_path, stdout=out,
                              stderr=subprocess.STDOUT, env=os.environ.copy(), timeout=600)
    log = log_file.read_text()
    assert proc.returncode == 0, log[-3000:]
    lines = re.split(r"[\r\n]", log)
    # diffusers' sampling bar has no description: its lines start with the percentage ("  0%|", "100%|").
    assert not [line for line in lines if re.match(r"\s*\d+%\|", line)], log[-3000:]
    assert "Loading pipeline components" not in log
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    shown = re.search(r"eval: top-1 (\S+) .*diversity ratio (\S+),", log)
    assert shown and all(len(re.sub(r"\D", "", x).lstrip("0")) <= 3 for x in shown.groups())  # 3 significant digits
    assert "hpo: objective" not in log  # no search is running

    card = ModelCard.load(run_dir / "export" / "README.md")
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["user accuracy (top-1)"] == round_sig(metrics["user_acc/top1"])
    assert card.data.license and card.data.model_name and "## Evaluation" in card.text
