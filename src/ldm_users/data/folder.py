"""Folder-per-user datasets: discover users and images, decode them once into a cached array.

`data_dir/<user>/<images>`: users are the subfolders, sorted by name (stable across runs and machines).
Images are decoded, converted to RGB and resized/cropped once, straight into a uint8 array file in the cache
(`images.npy`, N x H x W x 3), which every reader memory-maps and reads by index: training never decodes a file,
never meets a bad file mid-epoch, and never holds the whole dataset in RAM (a million 128 px images are 49 GB on
disk; the page cache keeps what fits).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldm_users.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadImage, load_image
from ldm_users.errors import DataError
from ldm_users.io import build_once, require_free_space
from ldm_users.progress import progress

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


def image_bytes(resolution: int) -> int:
    """Disk bytes per image in the decoded cache: uint8 RGB pixels and an int64 label (paths go to meta.json)."""
    return resolution * resolution * 3 + 8


def prepare_folder(data_dir, cache_dir, resolution: int, center_crop: bool = True, strict: bool = False,
                   max_pixels: int = DEFAULT_MAX_PIXELS, min_image_size: int = 8,
                   show_progress: bool = True) -> PreparedDataset:
    """Decode the folder dataset once into the cache (reused while the files are unchanged).

    One process decodes (the first to take the cache entry's lock: a rank, a sweep job, another node); the others
    wait, then map the same files."""
    scan = discover(data_dir)
    key = fingerprint(scan.files, scan.users, resolution, center_crop)
    target = Path(cache_dir) / "prepared" / f"{Path(data_dir).name}-r{resolution}-{key}"

    def build(tmp: Path) -> None:
        require_free_space(target.parent, len(scan.files) * image_bytes(resolution),
                           f"the decoded dataset cache ({len(scan.files)} images at {resolution} px)")
        kept, skipped = _decode_into(tmp, scan, Path(data_dir), resolution, center_crop, strict, max_pixels,
                                     min_image_size, show_progress)
        _write_meta(tmp, scan.users, kept, skipped, key, resolution, center_crop)

    build_once(target, build, ready=lambda t: (t / "meta.json").exists(), directory=True)
    return PreparedDataset(target)


def _decode_into(folder: Path, scan: ScanResult, data_dir: Path, resolution: int, center_crop: bool, strict: bool,
                 max_pixels: int, min_image_size: int, show_progress: bool) -> tuple[list, list]:
    """Decode every file straight into a memory-mapped images.npy (never the whole dataset in RAM); returns the
    (path, user) pairs it holds and the (path, reason) pairs it skipped."""
    images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8,
                                       shape=(len(scan.files), resolution, resolution, 3))
    labels, paths, skipped, small = [], [], list(scan.skipped), 0
    for path, user in progress(scan.files, desc=f"decoding {data_dir.name}", disable=not show_progress, unit="img"):
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
        images[len(labels)] = arr
        labels.append(user)
        paths.append(path)
    if strict and scan.skipped:
        path, reason = scan.skipped[0]
        raise DataError(f"{path}: {reason}. Remove the file, or set data.strict=false to skip it.")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(scan.users))
    empty = [u for u, c in zip(scan.users, counts) if c == 0]
    if empty:
        raise DataError(f"user folder {data_dir / empty[0]} has no readable image ({len(empty)} such user(s): "
                        f"{', '.join(empty[:5])}). Add images or remove the folder.")
    images.flush()
    del images
    _shrink_rows(folder / "images.npy", len(labels))
    np.save(folder / "labels.npy", np.asarray(labels, dtype=np.int64))
    if skipped:
        log.warning("skipped %d unusable file(s) under %s (first: %s: %s); the list is in the cache's meta.json",
                    len(skipped), data_dir, *skipped[0])
    if small > 5:
        log.warning("%d images were smaller than data.resolution=%d and were upscaled", small, resolution)
    return list(zip(paths, labels)), skipped


def _shrink_rows(path: Path, rows: int) -> None:
    """Cut an .npy file to its first `rows` rows in place (the skipped files' rows were never written).

    numpy pads an .npy header with room for a longer first dimension, precisely so that it can be rewritten in
    place; no copy of the data is made."""
    array = np.load(path, mmap_mode="r")
    if rows == len(array):
        return
    shape, offset, row_bytes = (rows, *array.shape[1:]), array.offset, array[0].nbytes
    del array
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    if len(header.getvalue()) != offset:
        raise RuntimeError(f"{path}: unexpected .npy header length")  # numpy changed its padding rule
    with open(path, "r+b") as f:
        f.write(header.getvalue())
        f.truncate(offset + rows * row_bytes)


def _write_meta(folder: Path, users: list[str], kept: list, skipped: list, key: str, resolution: int,
                center_crop: bool) -> None:
    def text(p) -> str:  # file names that are not valid UTF-8 are kept readable, not a crash
        return os.fsdecode(p) if isinstance(p, bytes) else p.encode("utf-8", "surrogateescape").decode("utf-8",
                                                                                                       "replace")

    meta = {"users": users, "fingerprint": key, "resolution": resolution, "center_crop": center_crop,
            "paths": [text(p) for p, _ in kept], "skipped": [[text(p), r] for p, r in skipped]}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
