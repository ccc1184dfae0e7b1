"""Encode the dataset with the frozen VAE once, and keep the latent posteriors on disk.

The cache is keyed by a hash of the VAE's weights, the prepared dataset's fingerprint and the resolution,
so later epochs and later runs (a sweep over denoisers on one VAE) skip the encoder entirely. It stores the
posterior mean and std, so every epoch still draws a fresh latent sample as the LDM paper does.

One .npy file of shape (N, 2, C, h, w) float32 (mean and std of each image side by side, so one image is one
contiguous read), written batch by batch and memory-mapped by every reader: neither encoding nor training holds
the whole cache in RAM (128 px with a 4-channel 32x32 latent: 32,768 bytes per image, 32.8 GB per million).
It is built once by whichever process takes its lock first (one rank of a job, one job of a sweep) while the
others wait, and written under a temporary name: a partial file is never read as valid.

Augmentation reaches the LDM through the cache: with `data.random_flip` and/or `train.augment.shift` it also
holds the posteriors of each image's variants (mirrored; moved by that many pixels, the border reflected), as
rows `variant * N + image`, and every epoch draws one variant per image (DataOrder). Without augmentation the
cache is what it always was, under the same name.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ldm_users.errors import ConfigError, DataError
from ldm_users.io import build_once, require_free_space
from ldm_users.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Augment:
    """The image variants encoded into the cache: (mirrored, dx, dy) for each; the first is the image itself."""

    flip: bool = False
    shift: int = 0  # pixels

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Augment:
        shift = int(OmegaConf.select(cfg, "train.augment.shift", default=0) or 0)
        if shift < 0 or shift >= int(cfg.data.resolution) // 2:
            raise ConfigError(f"train.augment.shift={shift}: use 0 (off) or a few pixels, less than half of "
                              f"data.resolution={cfg.data.resolution}.")
        return cls(flip=bool(cfg.data.get("random_flip", False)), shift=shift)

    @property
    def variants(self) -> list[tuple[bool, int, int]]:
        s = self.shift
        shifts = [(0, 0)] + ([(s, 0), (-s, 0), (0, s), (0, -s)] if s else [])
        return [(mirror, dx, dy) for mirror in ((False, True) if self.flip else (False,)) for dx, dy in shifts]

    @property
    def key(self) -> str:
        """Cache-name suffix ("" without augmentation: the plain cache keeps its name)."""
        return "" if len(self.variants) == 1 else f"-aug-f{int(self.flip)}-s{self.shift}"

    def apply(self, images: torch.Tensor, variant: int) -> torch.Tensor:
        """Variant `variant` of a batch NCHW: mirrored, then the content moved by (dx, dy), the border reflected."""
        mirror, dx, dy = self.variants[variant]
        if mirror:
            images = images.flip(-1)
        if dx or dy:
            s, (h, w) = self.shift, images.shape[-2:]
            padded = F.pad(images, (s, s, s, s), mode="reflect")
            images = padded[..., s - dy:s - dy + h, s - dx:s - dx + w]
        return images


@dataclass
class LatentCache:
    mean: torch.Tensor  # (V * N, C, h, w), unscaled posterior mean (a view of the memory-mapped file); row
    std: torch.Tensor   # (V * N, C, h, w)                          v * N + i is variant v of image i
    labels: torch.Tensor
    path: Path
    variants: int = 1   # V

    @property
    def num_images(self) -> int:
        return len(self.labels) // self.variants

    def to(self, device) -> "LatentCache":
        return LatentCache(self.mean.to(device), self.std.to(device), self.labels.to(device), self.path,
                           self.variants)

    def nbytes(self) -> int:
        return self.mean.nbytes + self.std.nbytes + self.labels.nbytes


def vae_hash(vae) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_path(cache_root, vae, dataset, augment: Augment = Augment()) -> Path:
    name = f"{vae_hash(vae)}-{dataset.fingerprint}-r{dataset.resolution}{augment.key}.npy"
    return Path(cache_root) / "latents" / name


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
def _encode(vae, path: Path, dataset, device, batch_size: int, show_progress: bool, augment: Augment) -> None:
    """Every image's (and variant's) posterior (mean, std), written batch by batch into a memory-mapped .npy."""
    out, n = None, len(dataset)
    batches = [(v, start) for v in range(len(augment.variants)) for start in range(0, n, batch_size)]
    for variant, start in progress(batches, desc="encoding latents", disable=not show_progress):
        images, _ = dataset.batch(range(start, min(start + batch_size, n)))
        dist = vae.encode(augment.apply(images, variant).to(device, vae.dtype)).latent_dist
        posterior = torch.stack([dist.mean.float(), dist.std.float()], dim=1).cpu().numpy()
        if out is None:  # the latent shape is known from the first batch
            shape = (len(augment.variants) * n, *posterior.shape[1:])
            require_free_space(path.parent, int(np.prod(shape)) * 4,
                               f"the latent cache ({shape[0]} images and variants, {shape[2:]} latents)")
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        row = variant * n + start
        out[row:row + len(posterior)] = posterior
    out.flush()


def load_or_encode(vae, dataset, cache_root, device, batch_size: int = 64, show_progress: bool = True,
                   augment: Augment = Augment()) -> LatentCache:
    """The dataset's latent posteriors (and its variants'), memory-mapped from the cache; encoded first by one
    process if missing."""
    path = cache_path(cache_root, vae, dataset, augment)
    variants = len(augment.variants)
    rows = variants * len(dataset)

    def build(tmp: Path) -> None:
        if path.exists():
            log.warning("latent cache %s is %s: rebuilding it", path, _open(path, rows)[1])
        _encode(vae, tmp, dataset, device, batch_size, show_progress, augment)

    build_once(path, build, ready=lambda p: _open(p, rows)[0] is not None)
    posterior, problem = _open(path, rows)
    if posterior is None:
        raise DataError(f"latent cache {path} could not be read back ({problem}): check free space and "
                        "permissions under paths.cache_dir (or point it elsewhere).")
    tensor = torch.from_numpy(posterior)
    return LatentCache(tensor[:, 0], tensor[:, 1], dataset.labels.repeat(variants), path, variants)
