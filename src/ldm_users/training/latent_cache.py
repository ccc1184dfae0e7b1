"""Encode the dataset with the frozen VAE once, and keep the latent posteriors on disk.

The cache is keyed by a hash of the VAE's weights, the prepared dataset's fingerprint and the resolution,
so later epochs and later runs (a sweep over denoisers on one VAE) skip the encoder entirely. It stores the
posterior mean and std, so every epoch still draws a fresh latent sample as the LDM paper does.

One .npy file of shape (N, 2, C, h, w) float32 (mean and std of each image side by side, so one image is one
contiguous read), written batch by batch and memory-mapped by every reader: neither encoding nor training holds
the whole cache in RAM (128 px with a 4-channel 32x32 latent: 32,768 bytes per image, 32.8 GB per million).
It is built once by whichever process takes its lock first (one rank of a job, one job of a sweep) while the
others wait, and written under a temporary name: a partial file is never read as valid.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldm_users.errors import DataError
from ldm_users.io import build_once, require_free_space
from ldm_users.progress import progress

log = logging.getLogger(__name__)


@dataclass
class LatentCache:
    mean: torch.Tensor  # (N, C, h, w), unscaled posterior mean (a view of the memory-mapped file)
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
    return Path(cache_root) / "latents" / f"{vae_hash(vae)}-{dataset.fingerprint}-r{dataset.resolution}.npy"


def _open(path: Path, expected: int) -> tuple[np.ndarray | None, str]:
    """The memory-mapped posteriors, or None and what is wrong with the file."""
    try:
        # Copy-on-write: a writable array for torch.from_numpy, whose writes (there are none) never reach the file.
        posterior = np.load(path, mmap_mode="c")
    except (OSError, ValueError, EOFError) as err:
        return None, f"unreadable ({type(err).__name__}: {err})"
    if posterior.dtype != np.float32 or posterior.ndim != 5 or posterior.shape[:2] != (expected, 2):
        return None, f"incomplete (shape {posterior.shape}, {posterior.dtype}; expected ({expected}, 2, C, h, w))"
    return posterior, ""


@torch.no_grad()
def _encode(vae, path: Path, dataset, device, batch_size: int, show_progress: bool) -> None:
    """Every image's posterior (mean, std), written batch by batch into a memory-mapped .npy at `path`."""
    out = None
    for start in progress(range(0, len(dataset), batch_size), desc="encoding latents", disable=not show_progress):
        images, _ = dataset.batch(range(start, min(start + batch_size, len(dataset))))
        dist = vae.encode(images.to(device, vae.dtype)).latent_dist
        posterior = torch.stack([dist.mean.float(), dist.std.float()], dim=1).cpu().numpy()
        if out is None:  # the latent shape is known from the first batch
            shape = (len(dataset), *posterior.shape[1:])
            require_free_space(path.parent, int(np.prod(shape)) * 4,
                               f"the latent cache ({len(dataset)} images, {shape[2:]} latents)")
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        out[start:start + len(posterior)] = posterior
    out.flush()


def load_or_encode(vae, dataset, cache_root, device, batch_size: int = 64, show_progress: bool = True) -> LatentCache:
    """The dataset's latent posteriors, memory-mapped from the cache; encoded first by one process if missing."""
    path = cache_path(cache_root, vae, dataset)

    def build(tmp: Path) -> None:
        if path.exists():
            log.warning("latent cache %s is %s: rebuilding it", path, _open(path, len(dataset))[1])
        _encode(vae, tmp, dataset, device, batch_size, show_progress)

    build_once(path, build, ready=lambda p: _open(p, len(dataset))[0] is not None)
    posterior, problem = _open(path, len(dataset))
    if posterior is None:
        raise DataError(f"latent cache {path} could not be read back ({problem}): check free space and "
                        "permissions under paths.cache_dir (or point it elsewhere).")
    tensor = torch.from_numpy(posterior)
    return LatentCache(tensor[:, 0], tensor[:, 1], dataset.labels, path)
