"""Image grids: one row per user, so a person can see at a glance whether users look different."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(images) -> np.ndarray:
    """Float tensor/array NCHW in [-1, 1] -> uint8 NHWC."""
    arr = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    arr = np.clip((arr + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return arr.transpose(0, 2, 3, 1)


# Cells smaller than this are enlarged (nearest neighbour, an integer factor, so pixels stay sharp and honest):
# a 32 px sample is a smudge on a screen.
MIN_CELL_PX = 96
HEADER_H = 16


def _enlarged(img: Image.Image, factor: int) -> Image.Image:
    img = img.convert("RGB")
    return img if factor == 1 else img.resize((img.width * factor, img.height * factor), Image.NEAREST)


def make_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, pad: int = 2,
              columns: list[tuple[str, int]] | None = None, min_cell: int = MIN_CELL_PX) -> Image.Image:
    """rows[i][j] -> a grid with an optional text label left of each row.

    columns: headers over spans of columns, e.g. [("real", 4), ("reconstruction", 4)], drawn above the first row.
    Small images are enlarged by an integer factor to at least `min_cell` pixels.
    """
    rows = [r for r in rows if r]
    factor = max(1, -(-min_cell // max(rows[0][0].size)))
    rows = [[_enlarged(img, factor) for img in row] for row in rows]
    w, h = rows[0][0].size
    label_w = max(6 * len(s) for s in labels) + 6 if labels else 0
    top = HEADER_H if columns else 0
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + ncol * (w + pad) + pad, top + len(rows) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    col = 0
    for title, span in columns or []:
        x0 = label_w + pad + col * (w + pad)
        draw.text((x0 + 2, 2), title, fill=(0, 0, 0))
        draw.line((x0, HEADER_H - 2, x0 + span * (w + pad) - pad - 1, HEADER_H - 2), fill=(0, 0, 0))
        col += span
    for i, row in enumerate(rows):
        y = top + pad + i * (h + pad)
        if labels:
            draw.text((3, y + h // 2 - 5), labels[i], fill=(0, 0, 0))
        for j, img in enumerate(row):
            grid.paste(img, (label_w + pad + j * (w + pad), y))
    return grid


def user_rows_grid(images: list[Image.Image], per_user: int, labels: list[str],
                   header: str = "generated") -> Image.Image:
    """Images generated user after user (per_user each) -> a grid with one labelled row per user."""
    rows = [images[i * per_user:(i + 1) * per_user] for i in range(len(labels))]
    return make_grid(rows, labels, columns=[(header, per_user)])
