"""ldm-bench at tiny sizes on a CPU: the table + JSON with every column and consistent ratios; memory truth."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ldm_users.config import compose as compose_config

METRICS = ["train images/s", "train step (ms)", "images per step", "peak train memory (GiB)",
           "MFU (fraction of dense bf16 peak)", "sampling images/s (batch 4, 3 steps + decode)",
           "sampling batch 1 (s/image)"]


def bench_cfg(*overrides):
    return compose_config(["experiment=bench_cpu", "logger=none", *overrides], config_name="bench")


@pytest.mark.slow
def test_bench_writes_table_and_json_with_sane_ratios(tmp_path):
    from ldm_users.cli.bench import run

    results = tmp_path / "results"
    result = run(bench_cfg(f"bench.results_dir={results}"), run_dir=tmp_path / "run")
    stem = "bench_unet_tiny_cpu_cpu"
    files = sorted(p.name for p in results.iterdir())
    js = next(p for p in results.glob(f"{stem}*.json"))
    md = js.with_suffix(".md")
    assert md.exists() and (results / "bench_summary.md").exists(), files
    data = json.loads(js.read_text())
    assert data["env"]["torch"] == torch.__version__ and data["env"]["diffusers"]
    assert data["env"]["device"].startswith("CPU")
    rows = {r["metric"]: r for r in data["rows"]}
    assert list(rows) == METRICS
    table = md.read_text()
    assert "| metric | reference | ours | ours/reference |" in table
    for metric, row in rows.items():
        assert f"| {metric} |" in table
        if metric.startswith("MFU"):  # no tensor-core peak for a CPU: reported as n/a, not invented
            assert row["reference"] is None and row["ours"] is None and row["ours/reference"] is None
            continue
        assert row["reference"] > 0 and row["ours"] > 0 and math.isfinite(row["ours"])
        assert row["ours/reference"] == pytest.approx(row["ours"] / row["reference"])
        assert 0.02 < row["ours/reference"] < 50, row
    # Throughput and step time describe the same measurement.
    train = data["train"]
    for variant in ("reference", "ours"):
        v = train[variant]
        assert v["images_per_s"] == pytest.approx(v["images_per_step"] / v["step_s"])
    assert rows["images per step"]["reference"] == 4 and rows["images per step"]["ours"] == 4
    assert data["train_flops_per_image"] > 1e6  # counted by torch.utils.flop_counter
    # Peak memory on CPU is traced and includes at least the weights + AdamW states of the denoiser.
    params = data["params"]["denoiser"] + data["params"]["user_encoder"]
    assert rows["peak train memory (GiB)"]["ours"] * 2**30 >= 12 * params
    assert result["rows"] == data["rows"]


@pytest.mark.slow
def test_memory_truth_agrees_with_diagnose_on_cpu(tmp_path):
    """The capped run (emulated on CPU by a live-tensor cap) and ldm-diagnose's verdict agree on both sides."""
    from ldm_users.cli.bench import run

    common = ["bench.mode=memory", "bench.memory.models=[unet_tiny]", "bench.memory.profiles=[cpu]",
              "bench.memory.reserve_gib=0", f"bench.results_dir={tmp_path}"]
    roomy = run(bench_cfg(*common, "bench.memory.memory_gb=1.0"))["memory_rows"][0]
    assert roomy["measured_fits"] is True and roomy["predicted_fits"] is True and roomy["agree"] is True
    # The diagnose trace and the real capped step measure the same thing.
    assert roomy["measured_peak_gib"] == pytest.approx(roomy["predicted_peak_gib"], rel=0.25)
    tight = run(bench_cfg(*common, f"bench.memory.memory_gb={roomy['predicted_peak_gib'] / 3}"))["memory_rows"][0]
    assert tight["measured_fits"] is False and tight["predicted_fits"] is False and tight["agree"] is True
    assert "over the emulated cap" in tight["note"]
    assert list(tmp_path.glob("bench-memory_cpu*.md")) and (tmp_path / "bench_summary.md").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU memory-cap path needs CUDA")
def test_memory_truth_gpu_cap(tmp_path):
    from ldm_users.cli.bench import run

    rows = run(bench_cfg("bench.mode=memory", "bench.memory.models=[unet_tiny]", "bench.memory.profiles=[gpu_8gb]",
                         f"bench.results_dir={tmp_path}"))["memory_rows"]
    assert rows[0]["measured_fits"] is True and rows[0]["agree"] is True
