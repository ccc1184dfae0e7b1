"""Which trained run an export came from, so an evaluation is named, grouped and filed with its model.

What was trained (model, vae, hardware, data, train) is the export's own `training_config.yaml`, the config as the
run left it (layout.trained_config_file says why that snapshot). An export inside a run dir (`<run>/export`) also
belongs to that run: its `metrics.jsonl` says which W&B group it is in, its `wandb_run.json` which W&B run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from ldm_users import layout
from ldm_users.errors import ConfigError
from ldm_users.inference.loading import training_config
from ldm_users.tracking import METRICS_FILE, read_metrics

log = logging.getLogger(__name__)

# What an evaluation takes over from the trained run: the data it must be judged on, and what names the run.
ADOPTED = ("data", "model", "vae", "hardware", "train", "seed")


trained_run_dir = layout.run_of_export  # the ldm-train run dir an export sits in, or None


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
    # The data module's code ldm-eval runs: its generator and its judge (data.oracle).
    for key in ("data.generate._target_", "data.oracle._target_"):
        target = OmegaConf.select(cfg, key, default=None)
        if target is not None and not str(target).startswith(TRUSTED_GENERATORS):
            raise ConfigError(f"{export}: its training config names {key}={target}, which is not one of ldm-users' "
                              f"dataset generators; ldm-eval will not run it. Evaluate it with your own data "
                              f"settings (data=folder data.data_dir=...).")


def adopt_trained_settings(cfg: DictConfig, export: Path, overrides: list[str]) -> DictConfig | None:
    """Take the trained run's data (unless the command line sets data) and the settings that describe the model
    into `cfg`, so the evaluation is judged on the right data and named, tagged and reported by what was trained."""
    trained = training_config(export)
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
            cfg[key] = value  # as the run resolved it (its data.root, its data.num_users)
    _refuse_foreign_generator(cfg, export)
    log.info("eval: settings of the trained run (model=%s, data=%s)", OmegaConf.select(cfg, "model.name"),
             OmegaConf.select(cfg, "data.name"))
    return trained
