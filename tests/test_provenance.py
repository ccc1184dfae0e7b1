"""An export evaluated away from its run dir is judged by its own training config, which must not run code."""

import pytest
from omegaconf import OmegaConf

from ldm_users.errors import ConfigError
from ldm_users.evaluation.provenance import adopt_trained_settings
from tests.helpers import compose


def _export(tmp_path, generate_target: str):
    export = tmp_path / "shared_export"
    export.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"data": {"name": "synthetic", "num_users": 3, "generate": {
        "_target_": generate_target, "root": "/tmp/x"}}, "model": {"name": "unet_tiny"}}),
        export / "training_config.yaml")
    return export


def test_an_exports_own_generator_is_adopted_a_foreign_target_is_refused(tmp_path):
    cfg = compose("export_path=x", config_name="eval")
    adopt_trained_settings(cfg, _export(tmp_path / "a", "ldm_users.data.synthetic.generate"), [])
    assert cfg.data.num_users == 3 and cfg.model.name == "unet_tiny"
    cfg = compose("export_path=x", config_name="eval")
    with pytest.raises(ConfigError, match="os.system.*will not run it"):
        adopt_trained_settings(cfg, _export(tmp_path / "b", "os.system"), [])
