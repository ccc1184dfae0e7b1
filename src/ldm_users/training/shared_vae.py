"""Which VAE a job uses, and training it once per sweep.

The jobs of a sweep over denoisers, learning rates or guidance dropout would each train the same VAE: same
architecture, settings, data and seed, identical weights. So a finished VAE is published under
`<paths.cache_dir>/vae/<key>/` (a `save_pretrained` folder, written atomically) and every later job with the same
key reuses it instead of training: sequential jobs, parallel ones (which wait on a file lock for the one job that
trains it), on one machine or on nodes sharing the file system. `vae_train.share=false` opts out.

The key hashes what determines the trained weights: the VAE config (architecture), the `vae_train` settings but
their cadence (sample/save/log intervals), the prepared dataset's fingerprint and resolution, the seed, random
flips, and the optimisation's batch, accumulation, number of processes and precision. A job that reuses a VAE
gets it as `<run>/vae/final` all the same, as hard links to the cached files (a copy across file systems): the run
dir stays complete when the cache is pruned or the run dir is moved, at no extra disk space, so `ldm-sample`, the
export and resuming never depend on the cache. Its log and tracker summary name the cache entry
(`vae/reused_from`) and the run that trained it, and it has no VAE training metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from ldm_users.config import to_container
from ldm_users.errors import ConfigError
from ldm_users.io import atomic_path, build_once, write_json
from ldm_users.layout import vae_final

log = logging.getLogger(__name__)

META_FILE = "ldm_users_vae.json"
# vae_train keys that change when or how often something is saved, logged or scored, never the trained weights.
NOT_IN_KEY = ("sample_interval", "save_interval", "log_interval", "checkpoints_total_limit", "max_bad_steps", "share",
              "recon_metrics")


def vae_key(cfg: DictConfig, dataset, accelerator) -> tuple[str, dict]:
    """A short hash of what determines the trained VAE's weights, and the values it hashes."""
    settings = to_container(cfg.vae_train)
    ingredients = {
        "vae": to_container(cfg.vae),
        "vae_train": {k: v for k, v in settings.items() if k not in NOT_IN_KEY},
        "dataset": dataset.fingerprint, "resolution": int(dataset.resolution), "seed": int(cfg.seed),
        "random_flip": bool(cfg.data.get("random_flip", False)),
        "batch_size": int(cfg.hardware.batch_size), "accumulation": int(accelerator.gradient_accumulation_steps),
        "processes": int(accelerator.num_processes), "mixed_precision": str(accelerator.mixed_precision),
    }
    # Files the settings only name (a pretrained VAE to start from, the perceptual loss's weights), when given.
    files = {name: _files_identity(OmegaConf.select(cfg.vae_train, name))
             for name in ("init_from", "perceptual.weights_path") if OmegaConf.select(cfg.vae_train, name)}
    if files:
        ingredients["files"] = files
    digest = hashlib.sha256(json.dumps(ingredients, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:16], ingredients


def _files_identity(path) -> list | None:
    """(name, size, modification time) of a file, or of each file in a folder: a file replaced at the same path
    gives another key (hashing a large pretrained VAE at every start would cost more than it protects)."""
    if not path or not Path(str(path)).exists():
        return None
    path = Path(str(path))
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def is_complete(folder: Path) -> bool:
    return (Path(folder) / "config.json").is_file() and (Path(folder) / META_FILE).is_file()


def link_files(src: Path, folder: Path) -> None:
    """Fill `folder` with the files of the flat folder `src`: hard links where the file system allows."""
    for item in Path(src).iterdir():
        try:
            os.link(item, folder / item.name)
        except OSError:  # another file system, or links not supported
            shutil.copy2(item, folder / item.name)


def link_tree(src: Path, dst: Path) -> Path:
    """`dst` as a complete copy of the flat folder `src` (hard links where possible), written atomically."""
    with atomic_path(dst, directory=True) as tmp:
        link_files(src, tmp)
    return Path(dst)


def obtain_vae(cfg: DictConfig, run_dir: Path, dataset, accelerator, tracker, train: Callable[[], Path]) -> Path:
    """The folder of this job's VAE: reused from an earlier job with the same key, else trained and published.

    `train()` trains this job's VAE into the run dir (every process of the job takes part) and returns its
    `save_pretrained` folder. With vae_train.share=false it is simply called.
    """
    share = cfg.vae_train.get("share", True)
    if not isinstance(share, bool):
        raise ConfigError(f"vae_train.share={share}: use vae_train.share=true or vae_train.share=false.")
    if not share:
        tracker.begin_stage("vae")
        return train()
    final = vae_final(run_dir)
    key, ingredients = vae_key(cfg, dataset, accelerator)
    entry = Path(str(cfg.paths.cache_dir)) / "vae" / key
    trained: list[Path] = []

    def build(tmp: Path) -> None:  # holding the lock: train this job's VAE, then publish it
        tracker.begin_stage("vae")
        trained.append(train())
        link_files(trained[0], tmp)
        write_json(tmp / META_FILE, {"key": key, "ingredients": ingredients, "trained_in": str(run_dir),
                                     "created": time.time()})

    if accelerator.num_processes == 1:
        build_once(entry, build, ready=is_complete, directory=True)
    else:
        _build_once_all_ranks(entry, build, train, trained, run_dir, accelerator)
    tracker.set_summary({"vae/key": key})
    if trained:
        if accelerator.is_main_process:
            log.info("VAE: trained by this job and shared as %s (key %s) with the later jobs of the same VAE "
                     "settings", entry, key)
        return trained[0]
    if accelerator.is_main_process:
        link_tree(entry, final)
        source = json.loads((entry / META_FILE).read_text()).get("trained_in", "?")
        scale = json.loads((entry / "config.json").read_text()).get("scaling_factor")
        tracker.set_summary({"vae/reused_from": str(entry), "vae/trained_in": source, "vae/scaling_factor": scale})
        log.info("VAE: reusing %s (trained in %s; key %s): no VAE training in this job. vae_train.share=false "
                 "trains its own.", entry, source, key)
    accelerator.wait_for_everyone()
    return final


def _build_once_all_ranks(entry: Path, build, train, trained: list, run_dir: Path, accelerator) -> None:
    """build_once for a job of several processes: only the main one takes the lock (the others must not queue
    behind their own main process, which needs them to train); they poll the file system instead of waiting in
    a collective, which would time out while another job holds the lock for hours."""
    from accelerate.utils import broadcast_object_list

    token = broadcast_object_list([uuid.uuid4().hex])[0]  # a name no earlier attempt can have left behind
    marker = Path(run_dir) / "vae" / f".share-train-{token}"
    if accelerator.is_main_process:
        def build_marked(tmp: Path) -> None:
            write_json(marker, {"token": token})  # tells the other ranks to join the training
            build(tmp)

        try:
            build_once(entry, build_marked, ready=is_complete, directory=True)
        finally:
            marker.unlink(missing_ok=True)
        return
    while not is_complete(entry):
        if marker.exists():
            trained.append(train())
            return
        time.sleep(1.0)
