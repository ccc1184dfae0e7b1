"""ldm-train's evaluation when training ends (eval.enabled=true): ldm-eval's sequence on the fresh export."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from ldm_users import layout
from ldm_users.data.folder import PreparedDataset
from ldm_users.evaluation.evaluate import evaluate_and_record

log = logging.getLogger(__name__)


def evaluate_after_training(cfg: DictConfig, export, run_dir, dataset: PreparedDataset, tracker,
                            is_main_process: bool = True) -> dict | None:
    """ldm-train's hook (eval.enabled=true): evaluate the fresh export into <run_dir>/eval and the run summary.

    A failing evaluation is reported (log and summary `eval/error`) but does not turn a finished training
    run into a failed one: the export is there, and `ldm-eval export_path=<run_dir>` can be rerun.
    """
    if cfg.get("eval") is None or not cfg.eval.get("enabled", False) or not is_main_process:
        return None
    if not layout.is_export(export):
        log.warning("eval.enabled=true but there is no export at %s (export.enabled=false?): evaluation skipped.",
                    export)
        return None
    try:
        return evaluate_and_record(cfg, export, Path(run_dir) / layout.EVAL_DIR, tracker, dataset=dataset)
    except Exception as err:  # noqa: BLE001 - reported; the finished training run stands
        log.error("evaluation of %s failed: %s. Rerun it with `ldm-eval export_path=%s`.", export, err, run_dir)
        tracker.set_summary({"eval/error": str(err)})
        return None
