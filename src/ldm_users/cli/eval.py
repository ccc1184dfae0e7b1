"""ldm-eval: generate K images per user from an export and judge them (accuracy, FD, KID, diversity, memorisation).

    ldm-eval export_path=outputs/runs/default
    ldm-eval -m export_path=outputs/runs/default sampler.guidance_scale=1,2,3,5

Writes metrics.json and grid.png into the Hydra run dir (one per job in a multirun).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm_users.config import config_dir
from ldm_users.errors import ConfigError, exit_on_user_error

log = logging.getLogger("ldm_users.cli.eval")


def resolve_export(path) -> Path:
    """An export dir, or a run dir holding export/ (checkpoint folders are accepted by the loader too)."""
    path = Path(str(path))
    if not path.exists():
        raise ConfigError(f"export_path={path} does not exist: give an export dir (from ldm-train) or a run dir.")
    if (path / "export" / "model_index.json").exists():
        return path / "export"
    return path


def _data_overridden(overrides: list[str]) -> bool:
    return any(o.lstrip("+~").split("=")[0].split(".")[0] == "data" for o in overrides)


def adopt_run_data(cfg: DictConfig, export: Path, overrides: list[str]) -> Path | None:
    """Use the data settings of the run that made the export, unless the command line sets data itself."""
    if _data_overridden(overrides):
        return None
    for run_dir in (export, export.parent):
        saved = run_dir / ".hydra" / "config.yaml"
        if saved.exists():
            data = OmegaConf.load(saved).get("data")
            if data is not None:
                if data.get("name") == cfg.data.get("name"):
                    # The same data group: keys added to it since that run (e.g. data.generate) keep their default.
                    data = OmegaConf.merge(cfg.data, data)
                with open_dict(cfg):
                    cfg.data = data  # interpolations (paths.cache_dir ...) resolve against this config
                log.info("eval: data settings from %s (data=%s)", saved, data.get("name"))
                return saved
    return None


def run(cfg: DictConfig, out_dir: Path, overrides: list[str] | None = None) -> dict:
    from ldm_users.evaluation.evaluate import evaluate_export, log_to_tracker
    from ldm_users.tracking import make_tracker

    export = resolve_export(cfg.export_path)
    adopt_run_data(cfg, export, list(overrides or []))
    tracker = make_tracker(cfg, out_dir, "eval", True)
    exit_code = 1
    try:
        metrics = evaluate_export(cfg, export, out_dir)
        log_to_tracker(tracker, metrics)
        exit_code = 0
    finally:
        tracker.finish(exit_code)
    print(f"ldm-eval: user top-1 {metrics['user_acc/top1']:.3f} (chance {metrics['user_acc/chance']:.3f}, "
          f"classifier held-out {metrics['classifier/holdout_top1']}), FD(classifier) {metrics['fd/classifier']:.4g}, "
          f"KID {metrics['kid/classifier']:.4g}, FID(Inception) {metrics['fd/inception']}, diversity ratio "
          f"{metrics['diversity/ratio']}, memorization ratio {metrics['memorization/ratio']}\n"
          f"ldm-eval: {out_dir / 'metrics.json'}, {out_dir / 'grid.png'}")
    return metrics


@hydra.main(config_path=config_dir(), config_name="eval", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))


if __name__ == "__main__":
    main()
