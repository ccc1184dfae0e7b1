"""Hydra/OmegaConf glue: where the configs live, our resolvers, and composing a config outside an app."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf


def config_dir() -> str:
    """The `conf/` folder: shipped inside the wheel, or the repository's own in an editable install."""
    packaged = Path(__file__).parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    repo = Path(__file__).resolve().parents[2] / "conf"
    if repo.is_dir():
        return str(repo)
    raise FileNotFoundError(f"no config folder found at {packaged} or {repo}")


def _latent_size(resolution, down_block_types) -> int:
    # Each down block but the last halves the image: 128 px with 3 blocks -> 32x32 latents.
    num_down = len(down_block_types) if isinstance(down_block_types, (list, ListConfig)) else int(down_block_types)
    return int(resolution) // 2 ** (num_down - 1)


def _run_name(override_dirname: str) -> str:
    # Hydra's override dirname is empty with no overrides; '/' from config paths would create subfolders.
    return (override_dirname or "default").replace("/", "_")


def register_resolvers() -> None:
    for name, fn in (("ldm_latent_size", _latent_size), ("ldm_run_name", _run_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose a config with Hydra's compose API (tests, notebooks), exactly as the app would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=False)


def to_container(cfg: DictConfig) -> dict:
    """The fully resolved config as plain Python (what W&B and checkpoints store)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in {"1", "true", "yes"}
