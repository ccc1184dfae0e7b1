"""ldm-train: stage=vae|ldm|all on the composed config. Hydra's output dir is the run dir."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ldm_users import hpo, layout
from ldm_users.compat import assert_compatible
from ldm_users.config import config_dir, old_style_run_dir
from ldm_users.data.loading import bind_num_users, prepare_dataset
from ldm_users.distributed import bind_global_batch, launcher_job
from ldm_users.errors import ConfigError, exit_on_user_error
from ldm_users.run_lock import hold_run_dir
from ldm_users.runtime import output_dir
from ldm_users.sweep import run_job
from ldm_users.tracking import make_tracker
from ldm_users.tracking.task import tracked
from ldm_users.training.common import make_accelerator
from ldm_users.training.final_eval import evaluate_after_training
from ldm_users.training.ldm_stage import train_ldm
from ldm_users.training.shared_vae import obtain_vae
from ldm_users.training.vae_stage import check_vae_matches, train_vae

log = logging.getLogger("ldm_users.cli.train")
logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise in the console


def refuse_to_split_an_old_run(cfg: DictConfig, run_dir: Path) -> None:
    """An existing run under its old-style dir name (`experiment=smoke`) would silently restart here: say how to
    move it instead (once moved, train.resume=auto continues it)."""
    old = old_style_run_dir(run_dir)
    # Only what Hydra and this job just wrote (its config and log, and the run dir's lock).
    fresh = all(p.name in (layout.HYDRA_DIR, layout.RUN_LOCK) or p.suffix == ".log" for p in run_dir.iterdir())
    if old is not None and fresh and str(cfg.train.resume) == "auto":
        new, old = shlex.quote(str(run_dir)), shlex.quote(str(old))
        raise ConfigError(f"this run is in its old-style dir {old}; run dirs are now named without '=' and ','. "
                          f"Move it: rm -r {new} && mv {old} {new}  (or start over here with train.resume=never)")


def run(cfg: DictConfig) -> dict:
    """Train the stages asked for; returns where the results are."""
    stage = str(cfg.stage)
    if stage not in ("vae", "ldm", "all"):
        raise ConfigError(f"stage={stage}: use stage=vae, stage=ldm or stage=all.")
    if cfg.data.get("num_users") is not None:
        assert_compatible(cfg)  # cheap, before the dataset is decoded or a model is built
    run_dir = output_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    refuse_to_split_an_old_run(cfg, run_dir)

    accelerator = make_accelerator(cfg)
    bind_global_batch(cfg, accelerator)
    dataset = prepare_dataset(cfg, show_progress=accelerator.is_main_process)
    bind_num_users(cfg, dataset.num_users)
    assert_compatible(cfg, dataset.num_users)
    log.info("dataset %s: %d images of %d users (%d files skipped)", cfg.data.root, len(dataset),
             dataset.num_users, len(dataset.skipped))

    result: dict = {"run_dir": str(run_dir)}
    # One tracker (one W&B run) per job, whatever stages it trains; finished as failed when a stage raises.
    with tracked(make_tracker(cfg, run_dir, "train", accelerator.is_main_process)) as tracker:
        # Files skipped as unusable (data.strict=false) when the dataset was prepared, counted where runs are compared.
        tracker.set_summary({"data/skipped_files": len(dataset.skipped), "data/images": len(dataset),
                             "data/users": dataset.num_users})
        vae_dir = Path(cfg.vae_path) if cfg.get("vae_path") else layout.vae_final(run_dir)
        if stage in ("vae", "all") and not cfg.get("vae_path"):
            if (vae_dir / "config.json").exists() and stage == "all":
                log.info("VAE: using the finished VAE in %s", vae_dir)
            else:  # trained by this job, or reused from an earlier job with the same VAE settings
                vae_dir = obtain_vae(cfg, run_dir, dataset, accelerator, tracker,
                                     train=lambda: train_vae(cfg, run_dir, dataset, accelerator, tracker))
        result["vae"] = str(vae_dir)
        if stage in ("ldm", "all"):
            if not (vae_dir / "config.json").exists():
                raise ConfigError(f"stage={stage} needs a trained VAE: none at {vae_dir}. Run stage=vae first, or "
                                  f"give vae_path=/path/to/vae (a save_pretrained folder).")
            check_vae_matches(vae_dir, cfg)
            tracker.begin_stage("ldm")
            try:
                export = train_ldm(cfg, run_dir, dataset, vae_dir, accelerator, hpo.trial_reporter(cfg, tracker))
            except hpo.Pruned as pruned:  # the search stopped this trial: a clean end, without export
                tracker.set_summary({"hpo/pruned_at_step": pruned.step})
                result["pruned"], export = pruned.step, None
            if export is not None:
                result["export"] = str(export)
                if cfg.logger.get("log_artifact", False) and export.exists():
                    tracker.log_artifact(export, name=f"export-{cfg.model.name}", type="model")
                result["eval"] = evaluate_after_training(cfg, export, run_dir, dataset, tracker,
                                                         accelerator.is_main_process)
    result["summary"] = dict(tracker.summary)  # after finish: with the figures derived from the whole history
    if accelerator.is_main_process:
        lines = [f"ldm-train: done. run dir: {run_dir}" if "pruned" not in result else
                 f"ldm-train: pruned by the search at step {result['pruned']} (its loss was behind the other trials'). "
                 f"run dir: {run_dir}"]
        if "export" in result:
            lines += [f"  sample grid (a row per user): {run_dir / 'ldm' / 'samples' / 'final.png'}",
                      f"  pipeline export: {result['export']}", "  next:",
                      f"  $ ldm-sample model_path={result['export']} num_images=4",
                      f"  $ ldm-eval export_path={run_dir}"]
        print("\n".join(lines))
    return result


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    # In a multirun a failed job is recorded in its status.json and the next job runs (see ldm_users.sweep).
    # A submitit job (hydra/launcher=slurm|local) of several tasks is one training over all of them.
    # The return value is the objective of a hyperparameter search (ldm_users.hpo); Hydra ignores it otherwise.
    hpo.check(cfg)
    # One writer per run dir: a second ldm-train on it refuses before writing anything (status.json included).
    with launcher_job(), hold_run_dir(output_dir(), "ldm-train"):
        return hpo.objective(cfg, run_job(run, cfg, output_dir()))


if __name__ == "__main__":
    main()
