"""Swap one config group of an already composed config (another model or hardware profile) inside a running app.

Hydra's compose API cannot be re-entered from inside @hydra.main, and the group files hold only
absolute interpolations (${data.resolution}, ${model.embed_dim}...), so loading a group file into
the copied config gives exactly what `ldm-train <group>=<name>` would compose.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

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
        new[group] = OmegaConf.load(path)
    return new


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
