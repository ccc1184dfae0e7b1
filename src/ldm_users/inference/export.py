"""A pipeline over in-memory parts (training grids, checkpoints, benchmarks) and the export writer.

An export is a diffusers `save_pretrained` folder that anyone with diffusers can load:

    DiffusionPipeline.from_pretrained(export, trust_remote_code=True)

model_index.json names the pipeline as `["pipeline_user_ldm", "UserLDMPipeline"]` and the user encoder as
`["condition", "UserConditionEncoder"]`, and the modules themselves lie beside the weights (diffusers' custom
pipelines and components: the pipeline module and its relative imports at the top, a component's module in its
subfolder). Beside them: `users.json`, `training_config.yaml` (what was trained, including the sampler settings
that ldm-sample and ldm-eval default to), the sample grid and a model card (README.md).
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

from diffusers.utils.dynamic_modules_utils import get_relative_import_files
from omegaconf import DictConfig, OmegaConf

from ldm_users import io
from ldm_users.config import to_container
from ldm_users.inference.model_card import SAMPLES_FILE, render_card
from ldm_users.layout import MODEL_INDEX, TRAINING_CONFIG_FILE, USERS_FILE
from ldm_users.pipeline import FAMILIES, UserDenoiser, UserLDMPipeline, family_of


def make_pipeline(vae, denoiser: UserDenoiser, scheduler, users: list[str],
                  latent_size: int | None = None) -> UserLDMPipeline:
    """A pipeline sharing the given modules (no copies), the backbone in its family's slot (`unet` or
    `transformer`). `latent_size` goes in the pipeline's config for families whose backbone config has none."""
    family = denoiser.family
    return UserLDMPipeline(vae=vae, scheduler=scheduler, user_encoder=denoiser.condition, user_names=users,
                           sample_size=family.pipeline_sample_size(latent_size), **{family.slot: denoiser.backbone})


def _copy_module(source: Path, folder: Path) -> str:
    """Copy a module and the files it imports relatively (what diffusers copies along); its name for
    model_index.json."""
    for path in [source, *map(Path, get_relative_import_files(str(source)))]:
        shutil.copyfile(path, folder / path.name)
    return source.stem


def ship_code(pipe, folder: Path) -> None:
    """Put the pipeline's code and its custom components' code in the export and name them in model_index.json,
    so that diffusers loads them with trust_remote_code=True (components of diffusers itself stay as they are)."""
    index = json.loads((folder / MODEL_INDEX).read_text())
    index["_class_name"] = [_copy_module(Path(inspect.getfile(type(pipe))), folder), type(pipe).__name__]
    for name, component in pipe.components.items():
        if component is None or type(component).__module__.split(".")[0] == "diffusers":
            continue
        module = _copy_module(Path(inspect.getfile(type(component))), folder / name)
        index[name] = [module, type(component).__name__]
    io.write_json(folder / MODEL_INDEX, index)


def write_model_card(export: Path, metrics: dict | None = None) -> Path:
    """(Re)write the export's README.md from what the folder holds, with `metrics` (ldm-eval's) when given."""
    export = Path(export)
    index = json.loads((export / MODEL_INDEX).read_text())
    slots = {family.slot for family in FAMILIES.values()}
    backbone = next(index[slot][1] for slot in sorted(slots) if (index.get(slot) or [None])[0])
    users = json.loads((export / USERS_FILE).read_text())["users"]
    card = render_card(OmegaConf.load(export / TRAINING_CONFIG_FILE), users, backbone, family_of(backbone).name, metrics,
                       samples=(export / SAMPLES_FILE).exists(), export=export)
    return io.write_text(export / "README.md", card)


def export_pipeline(pipe: UserLDMPipeline, out_dir: Path, training_cfg: DictConfig, grid: Path | None = None) -> Path:
    """The export folder, written to a temporary name and renamed into place (a kill leaves none or a whole one)."""
    with io.atomic_path(out_dir, directory=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        ship_code(pipe, tmp)
        io.write_json(tmp / USERS_FILE, {"users": pipe.user_names})
        OmegaConf.save(OmegaConf.create(to_container(training_cfg)), tmp / TRAINING_CONFIG_FILE)
        if grid is not None and Path(grid).exists():
            shutil.copyfile(grid, tmp / SAMPLES_FILE)
        write_model_card(tmp)
    return Path(out_dir)
