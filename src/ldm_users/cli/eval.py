"""ldm-eval: generate K images per user from an export and judge them (accuracy, FD, KID, diversity, memorisation).

    ldm-eval export_path=outputs/runs/default
    ldm-eval -m export_path=outputs/runs/default sampler.guidance_scale=1,2,3,5

Writes metrics.json and grid.png into the Hydra run dir (one per job in a multirun).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm_users.config import config_dir, run_dir_name
from ldm_users.errors import exit_on_user_error
from ldm_users.evaluation.evaluate import evaluate_and_record
from ldm_users.evaluation.provenance import adopt_trained_settings, trained_identity, trained_run_dir
from ldm_users.formatting import fmt
from ldm_users.inference.loading import adopt_run_sampler, resolve_export
from ldm_users.run_lock import hold_run_dir
from ldm_users.runtime import is_multirun, output_dir, override_dirname, task_overrides
from ldm_users.tracking import make_tracker
from ldm_users.tracking.task import tracked

log = logging.getLogger("ldm_users.cli.eval")


def eval_tracker(cfg: DictConfig, export: Path, out_dir: Path):
    """The evaluation's metrics go where its model's are.

    ldm-eval on a run dir (once) writes into that run's own W&B run, under `eval/`. An export outside a run dir,
    or a multirun (several settings of one model cannot share one summary), gets a run of its own that consumes
    the export as an artifact (W&B's lineage graph links them), named and grouped after the trained run.
    """
    run_dir = trained_run_dir(export)
    if run_dir is not None and not is_multirun():
        settings = {"eval": OmegaConf.to_container(cfg.eval, resolve=True),
                    "eval_sampler": OmegaConf.to_container(cfg.sampler, resolve=True)}
        return make_tracker(cfg, run_dir, "eval", join=True, config=settings)
    identity = trained_identity(export)
    with open_dict(cfg):
        if identity.get("group") and not cfg.logger.get("group"):
            cfg.logger.group = identity["group"]
        if not cfg.logger.get("run_name"):
            trained_name = identity.get("name") or OmegaConf.select(cfg, "model.name") or export.name
            settings = override_dirname() and run_dir_name(override_dirname())  # e.g. sampler.guidance_scale-2
            cfg.logger.run_name = "-".join(filter(None, [trained_name, "eval", settings]))
    tracker = make_tracker(cfg, out_dir, "eval")
    tracker.use_artifact(export, name=f"export-{OmegaConf.select(cfg, 'model.name') or 'model'}", type="model")
    return tracker


def run(cfg: DictConfig, out_dir: Path, overrides: list[str] | None = None) -> dict:
    export = resolve_export(cfg.export_path, "export_path")
    adopt_trained_settings(cfg, export, list(overrides or []))
    adopt_run_sampler(cfg, export, list(overrides or []))  # the run's sampler unless the command line sets one
    with tracked(eval_tracker(cfg, export, out_dir)) as tracker:
        # The card of the run's own export shows its scores (not those of one job of a settings sweep).
        metrics = evaluate_and_record(cfg, export, out_dir, tracker,
                                      card=trained_run_dir(export) is not None and not is_multirun())
    print(f"ldm-eval: user top-1 {fmt(metrics['user_acc/top1'], 3)} (chance {fmt(metrics['user_acc/chance'], 3)}, "
          f"classifier on held-out real images {fmt(metrics['classifier/holdout_top1'], 3)}), "
          f"FD(classifier) {fmt(metrics['fd/classifier'], 3)} (real held-out {fmt(metrics['fd/classifier_real_holdout'], 3)}), "
          f"KID {fmt(metrics['kid/classifier'], 3)}, FID(Inception) {fmt(metrics['fd/inception'], 3)}, "
          f"diversity ratio {fmt(metrics['diversity/ratio'], 3)}, memorisation ratio "
          f"{fmt(metrics['memorization/ratio'], 3)}\n"
          f"ldm-eval: {out_dir / 'metrics.json'}, {out_dir / 'grid.png'}\n  next, a table and plots of this evaluation:\n"
          f"  $ ldm-report {out_dir}")
    return metrics


@hydra.main(config_path=config_dir(), config_name="eval", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    # Evaluating a run's own export writes into that run (its W&B run, the export's model card): one writer there
    # at a time, as for ldm-train, which refuses or is refused the same way.
    run_dir = trained_run_dir(resolve_export(cfg.export_path, "export_path"))
    writes_there = run_dir is not None and not is_multirun()
    with hold_run_dir(run_dir, "ldm-eval") if writes_there else contextlib.nullcontext():
        run(cfg, output_dir(), task_overrides())


if __name__ == "__main__":
    main()
