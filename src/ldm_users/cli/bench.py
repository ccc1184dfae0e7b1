"""ldm-bench: the diffusers-example training loop vs ldm-train's own step, eager vs fast sampling.

    ldm-bench -m model=unet_light,unet_medium,unet_sd,dit hardware=h100_80gb
    ldm-bench experiment=bench_cpu logger=none                  # tiny, on a CPU
    ldm-bench bench.mode=memory                                  # every model x profile, GPU capped to the profile
    ldm-bench bench.mode=time_to_quality                         # recipes trained for a fixed time, then evaluated
    ldm-bench experiment=bench_cpu bench.mode=fast_paths         # each fast path's steps/s against fp32 eager

speed and memory: random weights and random data, no quality. Writes
<results_dir>/bench_<model>_<hardware>_<device>.{md,json} and refreshes <results_dir>/bench_summary.md.
time_to_quality: real training and ldm-eval; <results_dir>/time_to_quality_<name>.{md,json,png}.
fast_paths: <results_dir>/fast_paths_<model>_<device>.{md,json}.
The work is in perf/: bench_speed.py, bench_memory.py, bench_report.py, bench_quality.py, bench_fast_paths.py.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ldm_users.config import config_dir
from ldm_users.errors import ConfigError, exit_on_user_error
from ldm_users.perf.bench_fast_paths import run_fast_paths
from ldm_users.perf.bench_memory import run_memory
from ldm_users.perf.bench_quality import run_time_to_quality, write_quality_results
from ldm_users.perf.bench_report import (build_rows, device_name, device_of, env_info, log_to_tracker, slug,
                                         write_results)
from ldm_users.perf.bench_speed import run_speed
from ldm_users.perf.memory_model import parameter_counts
from ldm_users.runtime import output_dir


def run(cfg: DictConfig, run_dir: Path | None = None) -> dict:
    device = device_of()
    mode = str(cfg.bench.mode)
    if mode not in ("speed", "memory", "time_to_quality", "fast_paths"):
        raise ConfigError(f"bench.mode={mode}: use speed, memory, time_to_quality or fast_paths.")
    if mode == "time_to_quality":  # trains and evaluates in subprocesses: no device of its own, no tracker
        result = run_time_to_quality(cfg, run_dir or Path(str(cfg.bench.results_dir)) / "time_to_quality_runs")
        written = write_quality_results(result, Path(str(cfg.bench.results_dir)), run_dir)
        print(result["markdown"])
        print(f"ldm-bench: wrote {', '.join(map(str, written))}")
        return result
    if mode == "memory":
        result = run_memory(cfg, device)
        stem = f"bench-memory_{slug(device_name(device))}"
    elif mode == "fast_paths":
        result = run_fast_paths(cfg, device)
        stem = f"fast_paths_{cfg.model.name}_{slug(device_name(device))}"
    else:
        result = run_speed(cfg, device)
        result["params"] = parameter_counts(cfg)
        stem = f"bench_{cfg.model.name}_{cfg.hardware.name}_{slug(device_name(device))}"
    result["env"] = env_info(device)
    if mode == "speed":
        result["rows"] = build_rows(result)
    md, js = write_results(result, Path(str(cfg.bench.results_dir)), run_dir, stem)
    print(result["markdown"])
    print(f"ldm-bench: wrote {md} and {js}")
    log_to_tracker(cfg, result, run_dir)
    return result


@hydra.main(config_path=config_dir(), config_name="bench", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg, output_dir(cfg))


if __name__ == "__main__":
    main()
