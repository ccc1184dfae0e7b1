"""The report's plots: training loss per stage (one line per job), user accuracy against FD (one point per
evaluated job, labelled with its guidance scale), and on a model-size sweep final loss, user accuracy and
images/s against parameter count (one point per job: the picture the sweep exists for)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # a Figure saves to a file without pyplot or a display

from ldm_users.reporting.jobs import JobRow, number
from ldm_users.reporting.tables import varying

ACCURACY_KEY = "user_acc/top1"
# Standard FID when it was computed (eval.inception_weights; null otherwise), else the classifier-feature FD.
FD_KEYS = ("fd/inception", "fd/classifier")


def plot_losses(rows: list[JobRow], path: Path) -> Path | None:
    stages = [s for s in ("vae", "ldm") if any(s in r.curves for r in rows)]
    stages += sorted({s for r in rows for s in r.curves} - set(stages))
    if not stages:
        return None
    _, labels = varying(rows)
    fig = Figure(figsize=(6 * len(stages), 4.2))
    axes = fig.subplots(1, len(stages), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for row, label in zip(rows, labels):
            points = row.curves.get(stage)
            if points:
                steps, losses = zip(*points)
                ax.plot(steps, losses, marker="o" if len(points) < 20 else None, markersize=3,
                        label=f"{row.columns['job']}: {label}")
        ax.set_title(f"{stage} training loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        values = [v for r in rows for _, v in r.curves.get(stage, [])]
        if min(values) > 0 and max(values) / min(values) > 10:  # long runs: a log axis shows the late part
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def fd_key(rows: list[JobRow]) -> str | None:
    return next((k for k in FD_KEYS if any(k in r.evaluation for r in rows)), None)


def plot_eval(rows: list[JobRow], path: Path) -> Path | None:
    fd = fd_key(rows)
    points = [r for r in rows if fd and number(r.evaluation.get(ACCURACY_KEY)) is not None
              and number(r.evaluation.get(fd)) is not None]
    if not points:
        return None
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    scaled = sorted((r for r in points if number(r.columns.get("guidance_scale")) is not None),
                    key=lambda r: r.columns["guidance_scale"])
    if len(scaled) > 1:  # the trade-off as the guidance scale grows
        ax.plot([r.evaluation[fd] for r in scaled], [r.evaluation[ACCURACY_KEY] for r in scaled], color="0.6",
                zorder=1)
    for row in points:
        x, y = row.evaluation[fd], row.evaluation[ACCURACY_KEY]
        ax.scatter([x], [y], zorder=2)
        scale = number(row.columns.get("guidance_scale"))
        label = f"w={scale:g}" if scale is not None else f"job {row.columns['job']}"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(f"{fd} (lower is better)")
    ax.set_ylabel(f"{ACCURACY_KEY} (higher is better)")
    ax.set_title("user accuracy against FD")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# (column or evaluation key, axis label, log scale) of the scaling plot's panels, against the denoiser's parameters.
SCALING_PANELS = (("final_loss", "final LDM loss (smoothed)", True), (ACCURACY_KEY, "user accuracy (top-1)", False),
                  ("images_per_sec", "training images/s", True))


def plot_scaling(rows: list[JobRow], path: Path) -> Path | None:
    """Final loss, user accuracy and throughput against parameter count (log x), one labelled point per job;
    only when the jobs differ in size (a model-size sweep)."""
    sized = [r for r in rows if number(r.columns.get("params_denoiser"))]
    if len({r.columns["params_denoiser"] for r in sized}) < 2:
        return None
    panels = [p for p in SCALING_PANELS if any(number(r.value(p[0])) is not None for r in sized)]
    fig = Figure(figsize=(4.6 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, label, log_y) in zip(axes, panels):
        points = sorted((r.columns["params_denoiser"], number(r.value(key)), r.columns.get("model") or r.columns["job"])
                        for r in sized if number(r.value(key)) is not None)
        xs, ys, names = zip(*points)
        ax.plot(xs, ys, marker="o", color="C0")
        for x, y, name in points:
            ax.annotate(str(name), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        if log_y and min(ys) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("denoiser parameters")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("model-size sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
