"""ldm-report: the jobs of a sweep side by side, for people without W&B access.

    ldm-report outputs/multirun/2026-01-01_12-00-00            # or: python -m ldm_users.cli.report DIR [DIR ...]

Reads each job dir under the given dirs (a job dir holds .hydra/, and what the trainer and ldm-eval write:
status.json, metrics.jsonl = what went to W&B, metrics.json = evaluation metrics) and writes to `<DIR>/report/`
(or -o): report.md and report.csv (one row per job: model, parameters, final loss, throughput, peak memory,
evaluation metrics and guidance scale when present), loss_curves.png and, when the jobs were evaluated,
eval.png (accuracy against FD, one point per job, labelled with its guidance scale).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm_users.errors import DataError, exit_on_user_error
from ldm_users.reporting.jobs import EVAL_FILE, find_job_dirs, load_job
from ldm_users.reporting.plots import plot_eval, plot_losses, plot_scaling
from ldm_users.reporting.tables import write_tables
from ldm_users.tracking import METRICS_FILE


def make_report(dirs: list[Path], out_dir: Path | None = None) -> dict:
    dirs = [Path(d) for d in dirs]
    for d in dirs:
        if not d.is_dir():
            raise DataError(f"{d} is not a directory: pass a multirun dir (e.g. outputs/multirun/<date>) or run dirs.")
    job_dirs = [(i, j) for i, d in enumerate(dirs) for j in find_job_dirs(d)]
    if not job_dirs:
        raise DataError(f"no job dirs under {', '.join(map(str, dirs))} (a job dir holds .hydra/, {METRICS_FILE} "
                        f"or {EVAL_FILE}): pass the sweep dir `ldm-train -m` printed, e.g. outputs/multirun/<date>.")
    # In the order of the dirs given, then by Hydra job number.
    loaded = [(i, load_job(j)) for i, j in job_dirs]
    loaded.sort(key=lambda item: (item[0], item[1].columns["job"] is None, item[1].columns["job"] or 0,
                                  item[1].columns["job_dir"]))
    rows = [row for _, row in loaded]
    out_dir = Path(out_dir) if out_dir else dirs[0] / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_losses(rows, out_dir / "loss_curves.png")
    eval_plot = plot_eval(rows, out_dir / "eval.png")
    scaling_plot = plot_scaling(rows, out_dir / "scaling.png")
    plots = [p for p in (plot, eval_plot, scaling_plot) if p]
    md_path, csv_path, lines = write_tables(rows, out_dir, plots)
    return {"markdown": md_path, "csv": csv_path, "loss_plot": plot, "eval_plot": eval_plot,
            "scaling_plot": scaling_plot, "plots": plots, "rows": rows, "lines": lines}


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ldm-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="multirun dir(s) (or single run dirs) to compare")
    parser.add_argument("-o", "--out", type=Path, default=None, help="output folder (default: <first dir>/report)")
    args = parser.parse_args(argv)
    result = make_report(args.dirs, args.out)
    print("\n".join(result["lines"]))
    print(f"\nldm-report: wrote {', '.join(str(p) for p in [result['markdown'], result['csv'], *result['plots']])}")


if __name__ == "__main__":
    main()
