"""Hydra/OmegaConf glue: where the configs live, our resolvers, and composing a config outside an app."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ldm_users.runtime import hydra_config, is_multirun, override_dirname


def config_dir() -> str:
    """The `conf/` folder: shipped inside the wheel, or the repository's own in an editable install."""
    packaged = Path(__file__).parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    repo = Path(__file__).resolve().parents[2] / "conf"
    if repo.is_dir():
        return str(repo)
    raise FileNotFoundError(f"no config folder found at {packaged} or {repo}")


# A run dir name is made of what an unquoted value of a Hydra override (its grammar's ID and unquoted characters)
# and a shell word may both hold, so `model_path=outputs/runs/<name>` can be pasted as it is. Hydra joins the
# overrides with hydra.job.config.override_dirname's separators (conf/hydra/run_names: `-` and `+`); anything
# else a value brings ('/', '=', ',', brackets, spaces, ...) becomes '_'.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")
MAX_NAME = 200  # file systems allow 255 bytes; the sweep subdir adds "<job number>_"


def run_dir_name(override_dirname: str) -> str:
    """The run dir name for Hydra's override dirname, e.g. `experiment-smoke+model-unet_tiny`; "default" without
    overrides. Deterministic, so the same command finds the same run dir (train.resume=auto)."""
    name = _UNSAFE.sub("_", override_dirname) or "default"
    if len(name) > MAX_NAME:  # still one name per set of overrides: a hash of the whole stands for the cut part
        name = f"{name[:MAX_NAME - 11]}+{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def old_style_run_dir(run_dir: Path) -> Path | None:
    """The dir this job's run had before run dir names were made shell-safe (`experiment=smoke,model=x`: Hydra's
    override dirname with its default separators), when that dir exists."""
    hc = hydra_config()
    if hc is None:
        return None
    excluded = set(hc.job.config.override_dirname.exclude_keys)
    overrides = OverridesParser.create().parse_overrides(list(hc.overrides.task))
    name = ",".join(sorted(o.input_line for o in overrides if o.key_or_group not in excluded))
    name = name.replace("/", "_") or "default"
    if is_multirun():
        name = f"{hc.job.num}_{name}"
    if len(name) > 255:  # no file system holds a name this long, so no such run can exist
        return None
    old = Path(run_dir).parent / name
    return old if old != Path(run_dir) and old.is_dir() else None


def _latent_size(resolution, down_block_types) -> int:
    from ldm_users.pipeline.families import latent_size  # imported when a config first resolves it

    return latent_size(resolution, list(down_block_types))


def _family(target: str):
    from ldm_users.models.build import target_family

    return target_family(str(target))


def _objective(target: str) -> str | None:
    from ldm_users.errors import ConfigError

    try:
        return _family(target).objective
    except ConfigError:  # an unknown backbone: the compatibility check names it
        return None


def _flux_input_channels(latent_channels) -> int:
    """What older Flux runs' saved .hydra/config.yaml name as ${ldm_packed_channels:...} (before
    ldm_input_channels): the Flux family's input channels."""
    from ldm_users.pipeline.families import FluxFamily

    return FluxFamily().input_channels(int(latent_channels))


def register_resolvers() -> None:
    """${ldm_latent_size:<resolution>,<down blocks>}: the VAE latents' size; ${ldm_input_channels:<backbone
    _target_>,<latent channels>}: what the backbone's family takes per input position (Flux: a packed patch);
    ${ldm_objective:<backbone _target_>}: the family's default objective; ${ldm_run_name:...}: run_dir_name;
    ${ldm_job_name:}: the run dir name of this job's overrides ("default" outside a Hydra job)."""
    resolvers = {"ldm_latent_size": _latent_size,
                 "ldm_input_channels": lambda target, channels: _family(target).input_channels(int(channels)),
                 "ldm_objective": _objective,
                 "ldm_run_name": run_dir_name,
                 "ldm_job_name": lambda: run_dir_name(override_dirname()),
                 "ldm_packed_channels": _flux_input_channels}
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def compose(overrides: list[str] | None = None, config_name: str = "config",
            return_hydra_config: bool = False) -> DictConfig:
    """Compose a config with Hydra's compose API (tests, notebooks), exactly as the app would; with
    return_hydra_config=True it also holds the `hydra` node (for HydraConfig.instance().set_config)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []),
                             return_hydra_config=return_hydra_config)


def to_container(cfg: DictConfig) -> dict:
    """The fully resolved config as plain Python (what W&B and checkpoints store)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
