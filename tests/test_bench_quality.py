"""ldm-bench bench.mode=time_to_quality at toy size: a row per recipe x snapshot, the plot, a failing recipe."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import open_dict

from ldm_users.cli.bench import run
from ldm_users.config import compose as compose_config
from ldm_users.errors import ConfigError
from ldm_users.perf.bench_quality import eval_command, settings, train_command


def ttq_cfg(tmp_path, **ttq):
    cfg = compose_config(["logger=none", "bench.mode=time_to_quality", f"bench.results_dir={tmp_path / 'results'}"],
                         config_name="bench")
    with open_dict(cfg):
        cfg.bench.time_to_quality.update(ttq)
    return cfg


def test_recipe_overrides_come_after_base_and_cannot_move_the_budget(tmp_path):
    cfg = ttq_cfg(tmp_path, base=["experiment=smoke"], recipes={"a": ["train.lr=1e-3", "train.max_steps=50"]},
                  budget_s=4, eval_at_s=[2, 4])
    s = settings(cfg)
    assert s["name"] == "experiment-smoke"
    command = train_command(s, "a", tmp_path / "a")
    assert command.index("experiment=smoke") < command.index("train.lr=1e-3")
    assert command.index("train.max_steps=1000000000") < command.index("train.max_steps=50")  # the recipe's wins
    assert "train.max_train_seconds=4" in command and "train.snapshot_at_seconds=[2,4]" in command
    assert command.index("eval.enabled=false") > command.index("experiment=smoke")
    evaluated = eval_command(settings(ttq_cfg(tmp_path, eval=["sampler.num_inference_steps=5"])), "old",
                             tmp_path / "snap", tmp_path / "eval")
    # the old recipe is sampled as it was (DDIM), after the shared eval overrides
    assert evaluated.index("sampler.num_inference_steps=5") < evaluated.index("sampler=ddim")
    assert not any(o.startswith(("train.", "noise_scheduler.")) for o in evaluated)
    with pytest.raises(ConfigError, match="none past budget_s"):
        run(ttq_cfg(tmp_path, eval_at_s=[2, 8], budget_s=4), tmp_path / "run")


@pytest.mark.slow
def test_time_to_quality_table_and_plot_and_a_failing_recipe(tmp_path):
    recipes = {"broken": ["train.no_such_key=1"], "fast_lr": ["train.lr=3e-3"]}
    cfg = ttq_cfg(tmp_path, name="toy", base=["experiment=smoke"], budget_s=2, eval_at_s=[1, 2],
                  eval=["eval.images_per_user=2", "eval.classifier.steps=20"], recipes=recipes)
    result = run(cfg, tmp_path / "run")
    results = tmp_path / "results"
    assert (results / "time_to_quality_toy.png").stat().st_size > 0
    rows = json.loads((results / "time_to_quality_toy.json").read_text())["rows"]
    assert [(r["recipe"], r["at_s"]) for r in rows] == [(n, t) for n in recipes for t in (1.0, 2.0)]
    for row in rows:
        if row["recipe"] == "broken":  # reported with its error, and the recipes after it still ran
            assert row["error"].startswith("ldm-train:") and "no_such_key" in row["error"], row
            continue
        assert row["error"] is None, row
        assert 0.0 <= row["user_acc/top1"] <= 1.0 and math.isfinite(row["fd/classifier"]), row
        assert row["seconds"] >= row["at_s"] and row["steps"] >= 1 and row["images_seen"] == 8 * row["steps"]
    table = (results / "time_to_quality_toy.md").read_text()
    assert "| recipe | seconds | steps | images seen | user top-1 | FD | FD / real FD | error |" in table
    assert table.count("| fast_lr |") == 2 and result["vae"]["error"] is None
