"""Encode the dataset with the frozen VAE once, and keep the latent posteriors on disk.

The cache is keyed by a hash of the VAE's weights, the prepared dataset's fingerprint and the resolution,
so later epochs and later runs (a sweep over denoisers on one VAE) skip the encoder entirely. It stores the
posterior mean and std, so every epoch still draws a fresh latent sample as the LDM paper does. Files are
written to a temporary name and renamed; a partial file is never read as valid.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ldm_users.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class LatentCache:
    mean: torch.Tensor  # (N, C, h, w), unscaled posterior mean
    std: torch.Tensor   # (N, C, h, w)
    labels: torch.Tensor
    path: Path

    def to(self, device) -> "LatentCache":
        return LatentCache(self.mean.to(device), self.std.to(device), self.labels.to(device), self.path)

    def nbytes(self) -> int:
        return self.mean.nbytes + self.std.nbytes + self.labels.nbytes


def vae_hash(vae) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_path(cache_root, vae, dataset) -> Path:
    return Path(cache_root) / "latents" / f"{vae_hash(vae)}-{dataset.fingerprint}-r{dataset.resolution}.safetensors"


def _load(path: Path, expected: int) -> LatentCache | None:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        log.warning("latent cache %s is unreadable (%s): rebuilding it", path, err)
        return None
    if set(tensors) != {"mean", "std", "labels"} or len(tensors["labels"]) != expected:
        log.warning("latent cache %s is incomplete: rebuilding it", path)
        return None
    return LatentCache(tensors["mean"], tensors["std"], tensors["labels"].long(), path)


@torch.no_grad()
def load_or_encode(vae, dataset, cache_root, device, batch_size: int = 64, show_progress: bool = True,
                   is_main_process: bool = True, wait=lambda: None) -> LatentCache:
    """The dataset's latent posteriors: read from the cache, or encoded once (on the main process)."""
    path = cache_path(cache_root, vae, dataset)
    if path.exists():
        cached = _load(path, len(dataset))
        if cached is not None:
            return cached
    if is_main_process:
        means, stds = [], []
        for start in tqdm(range(0, len(dataset), batch_size), desc="encoding latents", disable=not show_progress):
            images, _ = dataset.batch(range(start, min(start + batch_size, len(dataset))))
            dist = vae.encode(images.to(device, vae.dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(),
                   "labels": dataset.labels.clone().contiguous()}, str(tmp))
        os.replace(tmp, path)
    wait()  # other ranks read what the main process wrote
    cached = _load(path, len(dataset))
    if cached is None:
        raise DataError(f"latent cache {path} could not be written or read back: check free space and "
                        "permissions under paths.cache_dir (or point it elsewhere).")
    return cached
