"""Which trained run an export came from, so an evaluation is named, grouped and filed with its model.

An export inside a run dir (`<run>/export`) belongs to that run: its `.hydra/config.yaml` says what was trained
(model, vae, hardware, data, train), its `metrics.jsonl` which W&B group it is in, its `wandb_run.json` which W&B run.
An export elsewhere carries the same settings in its own `training_config.yaml`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from ldm_users.errors import ConfigError
from ldm_users.inference.export import TRAINING_CONFIG_FILE
from ldm_users.tracking import METRICS_FILE, read_metrics

log = logging.getLogger(__name__)

# What an evaluation takes over from the trained run: the data it must be judged on, and what names the run.
ADOPTED = ("data", "model", "vae", "hardware", "train", "seed")


def trained_run_dir(export: Path) -> Path | None:
    """The ldm-train run dir an export sits in, or None."""
    export = Path(export)
    run_dir = export.parent
    return run_dir if export.name == "export" and (run_dir / ".hydra" / "config.yaml").exists() else None


def trained_config(export: Path) -> DictConfig | None:
    run_dir = trained_run_dir(export)
    for path in ((run_dir / ".hydra" / "config.yaml") if run_dir else None, Path(export) / TRAINING_CONFIG_FILE):
        if path is not None and path.exists():
            return OmegaConf.load(path)
    return None


def trained_identity(export: Path) -> dict:
    """The trained run's W&B name and group, as it recorded them (empty when unknown)."""
    run_dir = trained_run_dir(export)
    if run_dir is None or not (run_dir / METRICS_FILE).exists():
        return {}
    starts = [r for r in read_metrics(run_dir / METRICS_FILE) if r.get("event") == "start"
              and r.get("job_type") != "eval"]
    return {k: starts[0].get(k) for k in ("name", "group") if starts and starts[0].get(k)}


def _overridden(overrides: list[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=")[0].split(".")[0] == key for o in overrides)


# The dataset generators ldm-eval may run: a `data.generate._target_` read from an export is code the export names,
# and an export is a file anyone can hand you.
TRUSTED_GENERATORS = ("ldm_users.data.",)


def _refuse_foreign_generator(cfg: DictConfig, export: Path) -> None:
    target = OmegaConf.select(cfg, "data.generate._target_", default=None)
    if target is not None and not str(target).startswith(TRUSTED_GENERATORS):
        raise ConfigError(f"{export}: its training config names data.generate._target_={target}, which is not one of "
                          f"ldm-users' dataset generators; ldm-eval will not run it. Evaluate it with your own data "
                          f"settings (data=folder data.data_dir=...).")


def adopt_trained_settings(cfg: DictConfig, export: Path, overrides: list[str]) -> DictConfig | None:
    """Take the trained run's data (unless the command line sets data) and the settings that describe the model
    into `cfg`, so the evaluation is judged on the right data and named, tagged and reported by what was trained."""
    trained = trained_config(export)
    if trained is None:
        log.warning("eval: %s carries no training config: evaluating with the data settings given here.", export)
        return None
    with open_dict(cfg):
        for key in ADOPTED:
            if trained.get(key) is None or _overridden(overrides, key):
                continue
            value = trained[key]
            current = cfg.get(key)
            if OmegaConf.is_dict(value) and OmegaConf.is_dict(current) and value.get("name") == current.get("name"):
                # The same option of the group: keys added to it since that run (e.g. data.generate) keep their
                # defaults.
                value = OmegaConf.merge(current, value)
            cfg[key] = value  # interpolations (paths.cache_dir ...) resolve against this config
    _refuse_foreign_generator(cfg, export)
    log.info("eval: settings of the trained run (model=%s, data=%s)", OmegaConf.select(cfg, "model.name"),
             OmegaConf.select(cfg, "data.name"))
    return trained
