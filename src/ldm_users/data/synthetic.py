"""The built-in dataset: N users, each with a distinct, learnable visual identity, and its oracle.

A user's identity is a background hue, a foreground hue and a shape family; within a user the shape's
position, size and rotation and the background's shading vary. Background hues step around the colour
wheel in user order while foreground hues follow a coprime permutation, so two users close in one hue
are far apart in the other: the oracle can tell every user apart from colour alone, and a model that
mixes users up is caught. The dataset is written as a normal folder dataset (same code path as real data).
"""

from __future__ import annotations

import colorsys
import math
import os
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ldm_users.io import build_once

SHAPES = ("disk", "square", "triangle", "ring", "cross", "diamond")
BG_VALUE, FG_VALUE = 0.42, 0.95  # dark backgrounds, bright shapes: the oracle separates them by brightness
BG_SAT, FG_SAT = 0.75, 0.85
COMPLETE = ".complete"  # written last: a dataset folder without it is incomplete


@dataclass(frozen=True)
class UserStyle:
    bg_hue: float
    fg_hue: float
    shape: str


def _fg_multiplier(n: int) -> int:
    # A multiplier coprime with n near 0.39 n spreads neighbours' foreground hues far apart.
    m = max(1, round(0.39 * n))
    while gcd(m, n) != 1:
        m += 1
    return m


def user_styles(num_users: int) -> list[UserStyle]:
    m = _fg_multiplier(num_users)
    return [UserStyle(bg_hue=u / num_users, fg_hue=((u * m + num_users // 2) % num_users) / num_users,
                      shape=SHAPES[u % len(SHAPES)]) for u in range(num_users)]


def user_names(num_users: int) -> list[str]:
    return [f"user_{u:02d}" for u in range(num_users)]


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _polygon(cx, cy, radius, sides, angle):
    return [(cx + radius * math.cos(angle + 2 * math.pi * k / sides),
             cy + radius * math.sin(angle + 2 * math.pi * k / sides)) for k in range(sides)]


def _rotated_rect(cx, cy, half_w, half_h, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c)
            for x, y in ((-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h))]


def render(style: UserStyle, rng: np.random.Generator, resolution: int) -> Image.Image:
    """One image in the user's style. Drawn at 4x and downsampled for clean edges at small sizes."""
    scale = 4
    size = resolution * scale
    # Background: the user's hue with a gentle random-direction shading gradient.
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    direction = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + 0.12 * (xx * math.cos(direction) + yy * math.sin(direction))
    base = np.asarray(_rgb(style.bg_hue, BG_SAT, BG_VALUE), dtype=np.float64)
    canvas = np.clip(base[None, None, :] * shade[..., None], 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(img)

    radius = rng.uniform(0.22, 0.34) * size
    margin = radius * 1.05
    cx, cy = rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)
    angle = rng.uniform(0, 2 * math.pi)
    fg = _rgb(style.fg_hue, FG_SAT, FG_VALUE)
    if style.shape == "disk":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fg)
    elif style.shape == "ring":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=fg, width=int(radius * 0.4))
    elif style.shape == "square":
        draw.polygon(_polygon(cx, cy, radius, 4, angle), fill=fg)
    elif style.shape == "diamond":
        draw.polygon(_rotated_rect(cx, cy, radius * 0.45, radius, angle), fill=fg)
    elif style.shape == "triangle":
        draw.polygon(_polygon(cx, cy, radius, 3, angle), fill=fg)
    elif style.shape == "cross":
        draw.polygon(_rotated_rect(cx, cy, radius, radius * 0.3, angle), fill=fg)
        draw.polygon(_rotated_rect(cx, cy, radius * 0.3, radius, angle), fill=fg)
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)


def generate(root: str | os.PathLike, num_users: int = 31, images_per_user: int = 64, resolution: int = 128,
             seed: int = 1234) -> Path:
    """Write the dataset to root/<user>/<nnnn>.png once (by one process when several ask at once);
    deterministic in (num_users, images_per_user, seed)."""

    def build(tmp: Path) -> None:
        for u, (style, name) in enumerate(zip(user_styles(num_users), user_names(num_users))):
            rng = np.random.default_rng([seed, u])
            (tmp / name).mkdir(parents=True)
            for i in range(images_per_user):
                render(style, rng, resolution).save(tmp / name / f"{i:04d}.png")
        (tmp / COMPLETE).write_text("ok\n")

    return build_once(root, build, ready=lambda r: (r / COMPLETE).exists(), directory=True)


def _hues_and_values(images: np.ndarray):
    hsv = np.asarray([np.asarray(Image.fromarray(im).convert("HSV"), dtype=np.float64) / 255.0 for im in images])
    return hsv[..., 0], hsv[..., 1], hsv[..., 2]


def _circular_median(hues: np.ndarray) -> float:
    # Mean direction on the colour circle (hue is an angle); robust enough once outliers are masked.
    angles = hues * 2 * math.pi
    return (math.atan2(np.sin(angles).mean(), np.cos(angles).mean()) / (2 * math.pi)) % 1.0


def oracle_features(images: np.ndarray) -> np.ndarray:
    """(N, 2): estimated background hue and foreground hue of uint8 NHWC images."""
    hue, sat, val = _hues_and_values(images)
    feats = np.zeros((len(images), 2))
    for i in range(len(images)):
        border = np.concatenate([val[i, 0], val[i, -1], val[i, :, 0], val[i, :, -1]])
        border_h = np.concatenate([hue[i, 0], hue[i, -1], hue[i, :, 0], hue[i, :, -1]])
        bg_v = np.median(border)
        fg_mask = val[i] > bg_v + 0.5 * (FG_VALUE - BG_VALUE)
        bg_mask = np.abs(val[i] - bg_v) < 0.15
        feats[i, 0] = _circular_median(border_h) if not bg_mask.any() else _circular_median(hue[i][bg_mask])
        feats[i, 1] = _circular_median(hue[i][fg_mask]) if fg_mask.any() else feats[i, 0]
    return feats


def oracle_predict(images: np.ndarray, num_users: int) -> np.ndarray:
    """Which user's style each image was drawn in: nearest (bg hue, fg hue) prototype on the hue circle."""
    styles = user_styles(num_users)
    protos = np.asarray([[s.bg_hue, s.fg_hue] for s in styles])
    feats = oracle_features(np.asarray(images))
    diff = np.abs(feats[:, None, :] - protos[None, :, :])
    diff = np.minimum(diff, 1.0 - diff)  # circular distance
    return (diff ** 2).sum(-1).argmin(1)
