"""W&B tracking: offline by itself without a key or network; a tracking fault never stops training.

One W&B run per job (a job may train both stages): group = the sweep, name = the job's overrides,
job_type = the stage asked for. Each stage's metrics are plotted against their own `<stage>/step` axis, since
the VAE and the LDM both count steps from 1 and W&B drops history rows whose step goes backwards.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import secrets
import socket
import string
from pathlib import Path
from urllib.parse import urlparse

import wandb
from omegaconf import DictConfig

from ldm_users.io import write_json
from ldm_users.tracking.base import METRICS_FILE, RUN_ID_FILE, LocalTracker, resolved_config, stored_wandb_run
from ldm_users.tracking.naming import compare_keys, hardware_profile, run_name, run_tags, sweep_group

log = logging.getLogger(__name__)


def _server() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    return url.hostname or "api.wandb.ai", url.port or (443 if url.scheme != "http" else 80)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return _server()[0] in netrc.read_text()
    except OSError:
        return False


def _reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(_server(), timeout=timeout):
            return True
    except OSError:
        return False


def choose_mode(requested: str | None) -> tuple[str, str | None]:
    """(mode, why it is offline when nobody asked for that). logger.mode and WANDB_MODE win when given."""
    if requested:
        return str(requested), None
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], None
    if not _has_api_key():
        return "offline", "no W&B API key (`wandb login` or WANDB_API_KEY)"
    if not _reachable():
        return "offline", f"W&B server {_server()[0]} unreachable"
    return "online", None


def stored_run_id(run_dir: Path) -> str | None:
    """The W&B run id this run dir was tracked under, if any (one run dir = one W&B run)."""
    return stored_wandb_run(run_dir).get("id")


def _claim_run_id(run_dir: Path) -> str:
    """The run dir's W&B id, created and stored BEFORE wandb.init: a kill right after init must not leave a run
    the next attempt cannot find (it would start a second run for the same run dir)."""
    # Under `wandb agent` (a W&B sweep) the agent has chosen this run's id: another id would be a run the sweep
    # never sees finish.
    agent_id = os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None
    run_id = agent_id or stored_run_id(run_dir)
    if run_id is None:
        # W&B's own ids look like this (8 lowercase letters/digits); its generator is not public API.
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if run_id != stored_run_id(run_dir):
        write_json(Path(run_dir) / RUN_ID_FILE, {"id": run_id})
    return run_id


def _artifact_name(name: str) -> str:
    # W&B artifact names allow letters, digits, '-', '_' and '.'.
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "export"


class WandbTracker(LocalTracker):
    def __init__(self, run, run_dir: Path, job_type: str, cfg: DictConfig, mode: str):
        self.run = run
        self.mode = mode
        self.failed = False
        self._axes: set[str] = set()
        self._bound: set[str] = set()
        self._params: dict = {}
        super().__init__(run_dir, job_type, cfg, extra={"wandb_id": run.id, "wandb_mode": mode,
                                                        "wandb_dir": str(Path(run.dir).parent)})
        if getattr(run, "url", None) and stored_wandb_run(run_dir).get("id") == run.id:  # for the model card
            write_json(Path(run_dir) / RUN_ID_FILE, {"id": run.id, "url": run.url})

    @classmethod
    def start(cls, cfg: DictConfig, run_dir: Path, job_type: str, config: dict | None = None, join: bool = False
              ) -> WandbTracker | LocalTracker:
        """A W&B run for this job, else (with one warning line) the local metrics file alone.

        The run id is kept in `<run_dir>/wandb_run.json`: rerunning the same command (a resume after a kill, a
        SLURM requeue, `eval.enabled=true` afterwards, `ldm-eval` on the run dir) continues the same W&B run.
        `config`: what to record as the run's config (default: the resolved `cfg` and the system).
        """
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        mode, why_offline = choose_mode(cfg.logger.get("mode"))
        run = None
        init = functools.partial(cls._init, cfg, run_dir, job_type, config=config, join=join)
        try:
            run = init(mode, silent=why_offline is not None)
        except Exception as err:
            if mode != "online":
                log.warning("W&B could not start (%s: %s); tracking to %s only.", type(err).__name__,
                            str(err).splitlines()[0] if str(err) else "", Path(run_dir) / METRICS_FILE)
                return LocalTracker(run_dir, job_type, cfg)
            why_offline = f"W&B did not start online ({type(err).__name__})"
            mode = "offline"
        if run is None:
            try:
                run = init(mode, silent=True)
            except Exception as err:
                log.warning("W&B could not start offline either (%s); tracking to %s only.", err,
                            Path(run_dir) / METRICS_FILE)
                return LocalTracker(run_dir, job_type, cfg)
        if why_offline:
            offline_dir = Path(run.dir).parent
            log.warning("wandb: %s: logging offline to %s; upload later with `wandb sync %s`",
                        why_offline, offline_dir, offline_dir)
        return cls(run, Path(run_dir), job_type, cfg, mode)

    @staticmethod
    def _init(cfg: DictConfig, run_dir: Path, job_type: str, mode: str, silent: bool, config: dict | None = None,
              join: bool = False):
        if wandb.run is not None:  # a run left open (e.g. by a failed job of this multirun) must not get our data
            wandb.finish(exit_code=1)
        lcfg = cfg.logger
        if config is None:
            config = {**resolved_config(cfg), "compare": compare_keys(cfg), "system": hardware_profile()}
        # Joining keeps the run's own name, group, tags and job type (resume leaves unset fields as they are).
        identity = {} if join else {"group": sweep_group(cfg), "name": run_name(cfg), "job_type": job_type,
                                    "tags": run_tags(cfg, job_type)}
        return wandb.init(project=str(lcfg.get("project") or "ldm-users"), entity=lcfg.get("entity") or None,
                          id=_claim_run_id(run_dir), resume="allow", config=config, dir=str(run_dir), mode=mode,
                          reinit="finish_previous", settings=wandb.Settings(silent=silent, init_timeout=60),
                          **identity)

    def _safe(self, fn, *args, **kwargs) -> None:
        if self.run is None or self.failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:
            self.failed = True
            log.warning("W&B logging failed (%s); training goes on, metrics still go to %s.", err, self.metrics_path)

    def _log(self, data: dict, step: int | None) -> None:
        if step is not None:
            axis = f"{self.stage}/step"
            if axis not in self._axes:
                self.run.define_metric(axis)
                self._axes.add(axis)
            for key in data:  # a key is plotted against the axis of the stage that first logs it
                if key not in self._bound:
                    self.run.define_metric(key, step_metric=axis)
                    self._bound.add(key)
            data = {**data, axis: step}
        self.run.log(data)

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.is_logged(step):  # an earlier attempt of this run logged it (see LocalTracker)
            return
        super().log(metrics, step)
        self._safe(self._log, dict(metrics), step)

    def use_artifact(self, path, name: str, type: str) -> None:
        """Record `path` (e.g. the export an evaluation judged) as this run's input: W&B's lineage graph then links
        the evaluation to the model. Works offline: the artifact is described from the local folder."""
        super().use_artifact(path, name, type)

        def _use():
            artifact = wandb.Artifact(name=_artifact_name(name), type=type)
            artifact.add_dir(str(path), policy="immutable")
            self.run.use_artifact(artifact)

        self._safe(_use)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        super().log_table(key, columns, rows)
        self._safe(self.run.log, {key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def log_image(self, key: str, path, step: int | None = None, caption: str = "") -> None:
        super().log_image(key, path, step, caption)

        def _image():
            self._log({key: wandb.Image(str(path), caption=caption)}, step)

        self._safe(_image)

    def set_summary(self, metrics: dict) -> None:
        super().set_summary(metrics)
        self._safe(self.run.summary.update, metrics)
        # Parameter counts are also config values, so runs can be grouped and plotted by model size.
        params = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("params/")}
        if params:
            self._params.update(params)
            self._safe(self.run.config.update, {"params": dict(self._params)}, allow_val_change=True)

    def log_artifact(self, path, name: str, type: str) -> None:
        super().log_artifact(path, name, type)

        def _artifact():
            artifact = wandb.Artifact(name=_artifact_name(name), type=type)
            artifact.add_dir(str(path), policy="immutable")  # no copy of a multi-GB export; we never modify it
            self.run.log_artifact(artifact)

        self._safe(_artifact)

    def finish(self, exit_code: int = 0) -> None:
        super().finish(exit_code)
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as err:
                log.warning("W&B finish failed: %s", err)
            self.run = None
