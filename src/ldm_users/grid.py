"""Image grids: one row per user, so a person can see at a glance whether users look different."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(images) -> np.ndarray:
    """Float tensor/array NCHW in [-1, 1] -> uint8 NHWC."""
    arr = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    arr = np.clip((arr + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return arr.transpose(0, 2, 3, 1)


def make_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, pad: int = 2) -> Image.Image:
    """rows[i][j] -> a grid with an optional text label left of each row."""
    rows = [r for r in rows if r]
    w, h = rows[0][0].size
    label_w = 0
    if labels:
        label_w = max(6 * len(s) for s in labels) + 6
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        y = pad + i * (h + pad)
        if labels:
            draw.text((3, y + h // 2 - 5), labels[i], fill=(0, 0, 0))
        for j, img in enumerate(row):
            grid.paste(img.convert("RGB"), (label_w + pad + j * (w + pad), y))
    return grid


def user_rows_grid(images: list[Image.Image], per_user: int, labels: list[str]) -> Image.Image:
    """Images generated user after user (per_user each) -> a grid with one labelled row per user."""
    rows = [images[i * per_user:(i + 1) * per_user] for i in range(len(labels))]
    return make_grid(rows, labels)
