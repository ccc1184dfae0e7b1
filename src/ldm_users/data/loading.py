"""From the data config to a prepared dataset, with the user count bound into the config.

A generated dataset (`data=synthetic`, `data=fonts`) names its generator as a `_target_` node, `data.generate`,
called with the data settings to write the folder dataset at `data.root` once (later calls find it complete and
return at once); `data=folder` has `generate: null` and reads `data.data_dir` as it is. Both then go through
the same folder code.
"""

from __future__ import annotations

import logging

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from ldm_users.data.folder import PreparedDataset, prepare_folder
from ldm_users.errors import ConfigError, LdmUsersError

log = logging.getLogger(__name__)


def _generate(node: DictConfig) -> None:
    """Run a built-in generator (a `_target_` node) that writes the folder dataset at data.root once."""
    try:
        instantiate(node)
    except InstantiationException as err:
        # Hydra wraps whatever the target raises; our own errors already name the key and the fix.
        if isinstance(err.__cause__, LdmUsersError):
            raise err.__cause__ from None
        raise


def prepare_dataset(cfg: DictConfig, show_progress: bool = True) -> PreparedDataset:
    data = cfg.data
    if data.get("generate") is not None:
        if data.get("num_users") is not None and int(data.num_users) < 1:
            raise ConfigError(f"data.num_users={data.num_users}: a generated dataset (data={data.name}) needs at "
                              f"least one user.")
        _generate(data.generate)
    elif data.get("data_dir") in (None, "???"):
        raise ConfigError("data=folder needs data.data_dir=/path/to/images (one subfolder per user).")
    return prepare_folder(data.root, cfg.paths.cache_dir, int(data.resolution), bool(data.center_crop),
                          strict=bool(data.strict), show_progress=show_progress)


def bind_num_users(cfg: DictConfig, num_users: int) -> None:
    """Fill data.num_users from the dataset when the config leaves it open (folder datasets)."""
    if cfg.data.get("num_users") is None:
        with open_dict(cfg):
            cfg.data.num_users = num_users
