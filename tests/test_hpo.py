"""Hyperparameter search: the objective ldm-train returns, the Optuna search config and a real study that a rerun
continues, and the W&B sweep file (parsed and composed, no network)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ldm_users import hpo
from ldm_users.errors import ConfigError
from tests.helpers import REPO, compose

optuna_installed = pytest.mark.skipif(__import__("importlib").util.find_spec("optuna") is None,
                                      reason='pip install "ldm-users[hpo]"')


@pytest.fixture
def optimizing(monkeypatch):
    monkeypatch.setattr(hpo, "is_optimizing", lambda: True)


def test_objective_is_the_metric_and_the_worst_value_for_a_failed_trial(optimizing):
    cfg = compose("experiment=smoke")
    loss = cfg.hpo.metric  # the default: a smoothed loss, minimised
    assert loss.endswith("loss_smoothed") and cfg.hpo.direction == "minimize"
    assert hpo.objective(cfg, {"summary": {loss: 0.25}}) == 0.25
    assert hpo.objective(cfg, None) == math.inf  # a failed job: never the best, and the study goes on
    assert hpo.objective(cfg, {"summary": {loss: float("nan")}}) == math.inf
    up = compose("experiment=smoke", "hpo.metric=eval/user_acc/top1", "hpo.direction=maximize")
    assert hpo.objective(up, {"summary": {"eval/user_acc/top1": 0.75}}) == 0.75
    assert hpo.objective(up, None) == -math.inf
    with pytest.raises(ConfigError, match=r"hpo.metric=eval/user_acc/top1 .*numeric keys: ldm/loss_smoothed"):
        hpo.objective(up, {"summary": {"ldm/loss_smoothed": 0.3, "vae/reused_from": "x"}})


def test_objective_outside_an_optimising_sweep_never_fails():
    cfg = compose("experiment=smoke", "stage=vae")
    assert hpo.objective(cfg, {"run_dir": "x"}) is None  # stage=vae has no loss to return
    hpo.check(cfg)


def test_an_objective_the_job_cannot_produce_is_an_error_before_training(optimizing):
    with pytest.raises(ConfigError, match="add eval.enabled=true"):
        hpo.check(compose("experiment=smoke", "hpo.metric=eval/user_acc/top1"))
    hpo.check(compose("experiment=smoke", "hpo.metric=eval/user_acc/top1", "eval.enabled=true"))
    with pytest.raises(ConfigError, match="stage=vae"):
        hpo.check(compose("experiment=smoke", "stage=vae"))
    with pytest.raises(ConfigError, match="hpo.direction=minimize or hpo.direction=maximize"):
        hpo.check(compose("experiment=smoke", "hpo.direction=up"))


@optuna_installed
def test_the_search_config_composes_with_the_experiments_choices():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ldm_users.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = hydra_compose("config", ["hparams_search=ldm_optuna", "experiment=smoke"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.ldm_users_optuna.LdmOptunaSweeper"
    assert sweeper.pruner._target_ == "optuna.pruners.MedianPruner"
    assert sweeper.direction == "minimize" and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.params["model"] == "choice(unet_tiny,dit_tiny)"  # the smoke experiment's tiny sizes
    assert sweeper.params["train.lr"].startswith("tag(log, interval(")
    assert set(sweeper.params) == {"train.lr", "train.p_uncond", "train.ema.decay", "hardware.batch_size", "model"}


def _ldm_train(args: list[str], cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}\nimport sys\nfrom ldm_users.cli.train import main\nsys.argv = ['ldm-train', *{args!r}]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})


FAIL_SECOND_TRIAL = textwrap.dedent("""
    import ldm_users.training.ldm_stage as ldm_stage
    _train_ldm, calls = ldm_stage.train_ldm, []
    def train_ldm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return _train_ldm(*args, **kwargs)
    ldm_stage.train_ldm = train_ldm
""")


@optuna_installed
@pytest.mark.slow
def test_a_study_runs_its_trials_survives_a_failed_one_and_a_rerun_continues_it(tmp_path):
    import optuna
    from omegaconf import OmegaConf

    tiny = ["logger=none", "vae_train.max_steps=2", "vae_train.scale_samples=16", "train.max_steps=2",
            "train.log_interval=1", "sampler.num_inference_steps=2", "train.grid_per_user=1"]
    args = ["hparams_search=ldm_optuna", "experiment=smoke", *tiny]
    first = _ldm_train([*args, "hydra.sweeper.n_trials=3"], tmp_path, prelude=FAIL_SECOND_TRIAL)
    log = first.stdout + first.stderr
    assert first.returncode == 1, log[-3000:]  # a trial failed: reported at the end, after the study
    assert "1 of 3 jobs failed" in log and "injected failure" in log
    search = Path(os.environ["LDM_USERS_OUTPUT"]) / "hpo" / "ldm_optuna-smoke"
    study = optuna.load_study(study_name="ldm_optuna-smoke", storage=f"sqlite:///{search / 'optuna.db'}")
    values = [t.value for t in study.trials]
    assert len(values) == 3 and values[1] == math.inf and all(math.isfinite(v) for v in (values[0], values[2]))
    best = OmegaConf.load(search / "optimization_results.yaml")
    assert best.best_value == min(values[0], values[2]) and "Best value" in log
    assert set(best.best_params) == {"train.lr", "train.p_uncond", "train.ema.decay", "hardware.batch_size", "model"}
    assert sorted(p.name for p in search.glob("trial_*")) == ["trial_0", "trial_1", "trial_2"]

    # The same command with n_trials=5: the study continues with 2 more trials (not 5 new ones, no repeats).
    second = _ldm_train([*args, "hydra.sweeper.n_trials=5"], tmp_path)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "has 3 finished trial(s) of n_trials=5: running 2 more" in second.stdout + second.stderr
    study = optuna.load_study(study_name="ldm_optuna-smoke", storage=f"sqlite:///{search / 'optuna.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 5
    assert sorted(p.name for p in search.glob("trial_*")) == [f"trial_{i}" for i in range(5)]
    for trial in study.trials[3:]:  # each trial ran with the overrides Optuna chose and returned its loss
        job = OmegaConf.load(search / f"trial_{trial.number}" / ".hydra" / "config.yaml")
        assert job.train.lr == pytest.approx(trial.params["train.lr"]) and job.model.name == trial.params["model"]
    assert OmegaConf.load(search / "optimization_results.yaml").best_value == study.best_value

    # A finished study: rerunning runs nothing and reports the best again.
    third = _ldm_train([*args, "hydra.sweeper.n_trials=5"], tmp_path)
    assert third.returncode == 0 and "running 0 more" in third.stdout + third.stderr
    assert len(optuna.load_study(study_name="ldm_optuna-smoke",
                                 storage=f"sqlite:///{search / 'optuna.db'}").trials) == 5


@optuna_installed
@pytest.mark.slow
def test_a_trial_the_pruner_stops_ends_cleanly_and_is_told_to_the_study_as_pruned(tmp_path):
    import optuna
    from optuna.trial import TrialState

    # A pruner that stops any trial whose smoothed loss is above 0: the first report, once 5 losses are logged.
    always = ["hydra.sweeper.pruner=null", "hydra.sweeper.pruner={_target_: optuna.pruners.ThresholdPruner, upper: 0}"]
    args = ["hparams_search=ldm_optuna", "experiment=smoke", "logger=none", "vae_train.max_steps=2",
            "vae_train.scale_samples=16", "train.max_steps=8", "train.log_interval=1", "hydra.sweeper.n_trials=1",
            *always]
    out = _ldm_train(args, tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]  # a pruned trial is no failed job
    assert "pruned by the search at step 5" in log
    search = Path(os.environ["LDM_USERS_OUTPUT"]) / "hpo" / "ldm_optuna-smoke"
    (trial,) = optuna.load_study(study_name="ldm_optuna-smoke", storage=f"sqlite:///{search / 'optuna.db'}").trials
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [5]
    assert not (search / "trial_0" / "export").exists()  # stopped before the end: no export
    assert json.loads((search / "trial_0" / "status.json").read_text())["status"] == "ok"


# ---------------------------------------------------------------- the W&B sweep file

SWEEP_FILE = REPO / "experiments" / "wandb_sweep.yaml"


def _agent_command(sweep: dict, values: dict) -> list[str]:
    """The command `wandb agent` runs for one run with these parameter values, built by wandb's own code."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    macros.update(interpreter=[sys.executable], program=[sweep["program"]], env=["/usr/bin/env"])
    command = []
    for part in create_sweep_command(list(sweep["command"])):
        part = str(part)
        command += macros.get(part[2:-1], []) if part.startswith("${") and part.endswith("}") else [part]
    return command


def test_wandb_sweep_file_drives_ldm_train_with_hydra_overrides():
    sweep = yaml.safe_load(SWEEP_FILE.read_text())
    assert (REPO / sweep["program"]).is_file() and sweep["method"] in ("bayes", "random", "grid")
    assert sweep["metric"]["goal"] in ("minimize", "maximize") and "${args_no_hyphens}" in sweep["command"]
    assert sweep["project"] == compose().logger.project  # the runs log where the sweep looks for them
    params = sweep["parameters"]
    low = {k: p["values"][0] if "values" in p else p["min"] for k, p in params.items()}
    high = {k: p["values"][-1] if "values" in p else p["max"] for k, p in params.items()}
    for values in (low, high):
        command = _agent_command(sweep, values)
        assert command[:4] == ["/usr/bin/env", sys.executable, "-m", "ldm_users.cli.train"]
        overrides = command[4:]
        cfg = compose(*overrides)  # every argument is a valid Hydra override of ldm-train's config
        assert cfg.train.lr == pytest.approx(values["train.lr"]) and cfg.model.name == values["model"]
        assert cfg.hardware.batch_size == values["hardware.batch_size"]
        assert cfg.train.ema.decay == pytest.approx(values["train.ema.decay"])


@pytest.mark.slow
def test_wandb_agent_command_runs_ldm_train(tmp_path):
    """The agent's exact command line, run (printing the job config instead of training)."""
    sweep = yaml.safe_load(SWEEP_FILE.read_text())
    values = {k: p["values"][0] if "values" in p else p["min"] for k, p in sweep["parameters"].items()}
    command = _agent_command(sweep, values)
    out = subprocess.run([*command, "--cfg", "job"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    job = yaml.safe_load(out.stdout)
    assert job["model"]["name"] == values["model"] and job["train"]["lr"] == pytest.approx(values["train.lr"])
    assert job["hpo"]["metric"] == sweep["metric"]["name"]


def test_under_wandb_agent_the_run_keeps_the_agents_run_id(tmp_path, monkeypatch):
    from ldm_users.tracking.wandb import _claim_run_id, stored_run_id

    own = _claim_run_id(tmp_path)  # a run dir's own id, kept across reruns
    assert _claim_run_id(tmp_path) == own == stored_run_id(tmp_path)
    monkeypatch.setenv("WANDB_RUN_ID", "agent123")
    assert _claim_run_id(tmp_path) == own  # WANDB_RUN_ID alone (no sweep) does not take over a run dir
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep42")
    assert _claim_run_id(tmp_path) == "agent123" == stored_run_id(tmp_path)  # the sweep sees the run it started
