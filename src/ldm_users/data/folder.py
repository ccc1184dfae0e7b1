"""Folder-per-user datasets: discover users and images, decode them once into a cached array.

`data_dir/<user>/<images>`: users are the subfolders, sorted by name (stable across runs and machines).
Images are decoded, converted to RGB and resized/cropped once, then kept as a uint8 array in the cache
(`prepared.npy`, memory-mapped), so training never decodes a file and never meets a bad file mid-epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm_users.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadImage, load_image
from ldm_users.errors import DataError
from ldm_users.io import atomic_path

log = logging.getLogger(__name__)

PREPARED_VERSION = 1


@dataclass
class ScanResult:
    users: list[str]
    files: list[tuple[str, int]]  # (path, user index)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def discover(data_dir: str | os.PathLike) -> ScanResult:
    """List users and their candidate image files. Errors name the path and the fix."""
    root = Path(data_dir)
    if not root.exists():
        raise DataError(f"data.data_dir={root} does not exist. Point data.data_dir at a folder with one "
                        "subfolder of images per user, or use the built-in dataset with data=synthetic.")
    if not root.is_dir():
        raise DataError(f"data.data_dir={root} is a file, not a folder of user subfolders.")
    users = sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=True) and not _is_hidden(e.name))
    if not users:
        raise DataError(f"data.data_dir={root} has no user subfolders. Expected {root}/<user_name>/<images>.")
    files: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    for index, user in enumerate(users):
        # followlinks=False: a symlink loop cannot make the walk endless; linked files are still read.
        for dirpath, dirnames, filenames in os.walk(root / user, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if _is_hidden(name):
                    continue
                if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    skipped.append((path, "not an image extension"))
                    continue
                try:
                    os.stat(path)  # follows symlinks: dangling links and loops fail here
                except OSError as err:
                    skipped.append((path, f"unreadable: {err.strerror or err}"))
                    continue
                files.append((path, index))
    return ScanResult(users=users, files=files, skipped=skipped)


def fingerprint(files: list[tuple[str, int]], users: list[str], resolution: int, center_crop: bool) -> str:
    """Changes when any file, its size or mtime, the user list or the preprocessing changes."""
    h = hashlib.sha256(json.dumps([PREPARED_VERSION, users, resolution, center_crop]).encode())
    for path, user in files:
        st = os.stat(path)
        h.update(f"{os.fsencode(path)!r}|{user}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class PreparedDataset(torch.utils.data.Dataset):
    """Decoded images (uint8, N x H x W x 3, memory-mapped) with their user index and the user map."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.users: list[str] = meta["users"]
        self.fingerprint: str = meta["fingerprint"]
        self.resolution: int = meta["resolution"]
        self.skipped: list[tuple[str, str]] = [tuple(s) for s in meta["skipped"]]
        self.paths: list[str] = meta["paths"]
        self.images = np.load(self.folder / "images.npy", mmap_mode="r")
        self.labels = torch.from_numpy(np.load(self.folder / "labels.npy")).long()
        if len(self.images) != len(self.labels):
            raise DataError(f"prepared dataset {self.folder} is inconsistent; delete it to rebuild.")

    @property
    def num_users(self) -> int:
        return len(self.users)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return to_model_range(self.images[i]), int(self.labels[i])

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices)
        return to_model_range(self.images[idx]), self.labels[torch.as_tensor(idx)]

    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_users).tolist()


def to_model_range(uint8_hwc) -> torch.Tensor:
    """uint8 HWC (or NHWC) -> float CHW (NCHW) in [-1, 1]."""
    t = torch.from_numpy(np.array(uint8_hwc, copy=True)).float().div_(127.5).sub_(1.0)  # memmap is read-only
    return t.permute(2, 0, 1) if t.ndim == 3 else t.permute(0, 3, 1, 2)


def prepare_folder(data_dir, cache_dir, resolution: int, center_crop: bool = True, strict: bool = False,
                   max_pixels: int = DEFAULT_MAX_PIXELS, min_image_size: int = 8,
                   show_progress: bool = True) -> PreparedDataset:
    """Decode the folder dataset once into the cache (reused while the files are unchanged)."""
    scan = discover(data_dir)
    key = fingerprint(scan.files, scan.users, resolution, center_crop)
    target = Path(cache_dir) / "prepared" / f"{Path(data_dir).name}-r{resolution}-{key}"
    if (target / "meta.json").exists():
        return PreparedDataset(target)

    arrays, labels, paths, skipped = [], [], [], list(scan.skipped)
    small = 0
    for path, user in tqdm(scan.files, desc=f"decoding {Path(data_dir).name}", disable=not show_progress,
                           unit="img"):
        try:
            arr, (w, h) = load_image(path, resolution, center_crop, max_pixels=max_pixels, min_size=min_image_size)
        except BadImage as err:
            if strict:
                raise DataError(f"{path}: {err}. Remove or fix the file, or set data.strict=false "
                                "to skip bad files.") from None
            skipped.append((path, str(err)))
            continue
        if min(w, h) < resolution:
            small += 1
            if small <= 5:
                log.warning("%s is %dx%d, smaller than data.resolution=%d: upscaled", path, w, h, resolution)
        arrays.append(arr)
        labels.append(user)
        paths.append(path)
    if strict and scan.skipped:
        path, reason = scan.skipped[0]
        raise DataError(f"{path}: {reason}. Remove the file, or set data.strict=false to skip it.")

    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(scan.users))
    empty = [u for u, c in zip(scan.users, counts) if c == 0]
    if empty:
        folder = Path(data_dir) / empty[0]
        raise DataError(f"user folder {folder} has no readable image ({len(empty)} such user(s): "
                        f"{', '.join(empty[:5])}). Add images or remove the folder.")
    if skipped:
        log.warning("skipped %d unusable file(s) under %s (first: %s: %s); the list is in %s/meta.json",
                    len(skipped), data_dir, skipped[0][0], skipped[0][1], target)
    if small > 5:
        log.warning("%d images were smaller than data.resolution=%d and were upscaled", small, resolution)

    # Written aside and renamed into place: a killed run never leaves a half-written prepared dataset; a process
    # that finished the same entry first wins (same key, identical content).
    with atomic_path(target, directory=True, keep_existing=True) as tmp:
        np.save(tmp / "images.npy", np.stack(arrays))
        np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        meta = {"users": scan.users, "fingerprint": key, "resolution": resolution, "center_crop": center_crop,
                "paths": [os.fsdecode(p) if isinstance(p, bytes) else p.encode("utf-8", "surrogateescape")
                          .decode("utf-8", "replace") for p in paths],
                "skipped": [[p.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), r]
                            for p, r in skipped],
                "small_images": small}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return PreparedDataset(target)
