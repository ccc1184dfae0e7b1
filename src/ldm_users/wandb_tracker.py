"""W&B tracking: offline by itself without a key or network; a tracking fault never stops training."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from ldm_users.config import to_container
from ldm_users.tracking import NullTracker

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def choose_mode(requested: str | None) -> str:
    if requested:
        return str(requested)
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if _has_api_key() else "offline"


def run_name(cfg: DictConfig, job_type: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().job.override_dirname
    except Exception:
        overrides = ""
    return overrides or f"model={cfg.model.name},hardware={cfg.hardware.name}"


def sweep_group(cfg: DictConfig) -> str | None:
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        if hc.mode.name == "MULTIRUN":
            return Path(hc.sweep.dir).name
    except Exception:
        pass
    return None


class WandbTracker(NullTracker):
    def __init__(self, run):
        super().__init__()
        self.run = run
        self.run_dir = Path(run.dir).parent if run is not None else None
        self.failed = False

    @classmethod
    def start(cls, cfg: DictConfig, run_dir: Path, job_type: str) -> "WandbTracker | NullTracker":
        try:
            import wandb

            mode = choose_mode(cfg.logger.get("mode"))
            if mode == "offline" and not cfg.logger.get("mode") and not os.environ.get("WANDB_MODE"):
                print(f"wandb: no API key or network: logging offline to {run_dir}/wandb; "
                      f"upload later with `wandb sync {run_dir}/wandb/offline-run-*`")
            if wandb.run is not None:  # never append to a run left open by a previous job
                wandb.finish()
            run = wandb.init(project=cfg.logger.project, entity=cfg.logger.get("entity"), group=sweep_group(cfg),
                             name=run_name(cfg, job_type), job_type=job_type, tags=list(cfg.logger.get("tags") or []),
                             config=to_container(cfg), dir=str(run_dir), mode=mode, reinit="finish_previous")
            return cls(run)
        except Exception as err:  # tracking must never stop training
            log.warning("W&B could not start (%s); continuing without tracking.", err)
            return NullTracker()

    def _safe(self, fn, *args, **kwargs):
        if self.run is None or self.failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:
            self.failed = True
            log.warning("W&B logging failed (%s); training goes on without tracking.", err)

    def log(self, metrics: dict, step: int | None = None) -> None:
        self._safe(self.run.log, metrics, step=step)

    def log_image(self, key: str, path, step: int | None = None, caption: str = "") -> None:
        import wandb

        self._safe(lambda: self.run.log({key: wandb.Image(str(path), caption=caption)}, step=step))

    def set_summary(self, metrics: dict) -> None:
        super().set_summary(metrics)
        self._safe(self.run.summary.update, metrics)

    def log_artifact(self, path, name: str, type: str) -> None:
        import wandb

        def _log():
            artifact = wandb.Artifact(name=name, type=type)
            artifact.add_dir(str(path))
            self.run.log_artifact(artifact)

        self._safe(_log)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as err:
                log.warning("W&B finish failed: %s", err)
            self.run = None
