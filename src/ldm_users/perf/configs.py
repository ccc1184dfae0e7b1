"""Swap one config group of an already composed config (another model or hardware profile) inside a running app.

The option is composed on its own by Hydra (so its `defaults`, e.g. a model size's `_base_`, are applied) and put
in place of the group in a copy of the config. The group files hold only absolute interpolations
(${data.resolution}, ${model.embed_dim}...), so this gives exactly what `ldm-train <group>=<name>` would compose.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from ldm_users.config import config_dir
from ldm_users.errors import ConfigError


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def with_group(cfg: DictConfig, group: str, name: str) -> DictConfig:
    """A copy of cfg with cfg.<group> replaced by conf/<group>/<name>.yaml (as shipped: no overrides)."""
    path = Path(config_dir()) / group / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"{group}={name}: no {path}; choose one of {', '.join(group_options(group))}.")
    new = cfg.copy()
    with open_dict(new):
        new[group] = compose_option(group, name)
    return new


def compose_option(group: str, name: str) -> DictConfig:
    """conf/<group>/<name>.yaml with its defaults applied, as the node that goes under `group`."""
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its search path is ours
        return compose(config_name=f"{group}/{name}")[group]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=f"{group}/{name}")[group]


def resolve_list(value, group: str, current: str) -> list[str]:
    """`all` | `current` | a name | a list of names -> profile names (checked)."""
    if value in (None, "current"):
        return [current]
    if value == "all":
        return group_options(group)
    names = [value] if isinstance(value, str) else [str(v) for v in value]
    known = group_options(group)
    for name in names:
        if name not in known:
            raise ConfigError(f"{group} option {name!r} does not exist; choose from {', '.join(known)}.")
    return names
