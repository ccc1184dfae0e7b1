"""The `fonts` benchmark: each user is a typeface, each image a short string set in it.

Harder than `synthetic`, and closer to handwriting or faces: users differ only in letterforms (serifs, stroke
contrast, slant, weight, width), never in colour. Within a user the text's position, size, rotation and stroke
width and the ink and paper tones vary, so a generator has to learn a shape style, from as few as 10 images per
user. The typefaces are the TrueType files matplotlib ships (mpl-data/fonts/ttf): nothing is downloaded. The
bytes written depend on (the arguments, the font files, Pillow's FreeType), so they are identical from run to
run on one installation.
"""

from __future__ import annotations

import colorsys
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ldm_users.errors import ConfigError
from ldm_users.data.synthetic import COMPLETE
from ldm_users.io import build_once

# (user folder name, file under mpl-data/fonts/ttf), ordered so that any prefix spreads over the families
# (a small num_users still mixes sans, serif, mono, Computer Modern and STIX). Left out: cmmi10 (Computer Modern
# math italic), whose letters are cmti10's design: rendered with the same draws the two differ by half as much
# as the closest other pair (tests/test_fonts.py); and the symbol-only files (cmsy10, cmex10, STIX NonUni/Size).
FONTS: tuple[tuple[str, str], ...] = (
    ("dejavu_sans", "DejaVuSans.ttf"),
    ("dejavu_serif", "DejaVuSerif.ttf"),
    ("stix_general", "STIXGeneral.ttf"),
    ("cm_roman", "cmr10.ttf"),
    ("dejavu_sans_mono", "DejaVuSansMono.ttf"),
    ("cm_sans", "cmss10.ttf"),
    ("dejavu_sans_bold", "DejaVuSans-Bold.ttf"),
    ("dejavu_serif_bold", "DejaVuSerif-Bold.ttf"),
    ("stix_general_bold", "STIXGeneralBol.ttf"),
    ("cm_typewriter", "cmtt10.ttf"),
    ("dejavu_sans_mono_bold", "DejaVuSansMono-Bold.ttf"),
    ("cm_bold", "cmb10.ttf"),
    ("dejavu_sans_oblique", "DejaVuSans-Oblique.ttf"),
    ("dejavu_serif_italic", "DejaVuSerif-Italic.ttf"),
    ("stix_general_italic", "STIXGeneralItalic.ttf"),
    ("cm_italic", "cmti10.ttf"),
    ("dejavu_sans_mono_oblique", "DejaVuSansMono-Oblique.ttf"),
    ("dejavu_sans_bold_oblique", "DejaVuSans-BoldOblique.ttf"),
    ("dejavu_serif_bold_italic", "DejaVuSerif-BoldItalic.ttf"),
    ("stix_general_bold_italic", "STIXGeneralBolIta.ttf"),
    ("dejavu_sans_mono_bold_oblique", "DejaVuSansMono-BoldOblique.ttf"),
)

SUPERSAMPLE = 4  # drawn at 4x and downsampled: clean strokes at 32 px
# Within-user variation. Kept below what tells fonts apart: rotation well under an oblique's ~11 degree slant,
# size under the width difference between a regular and a condensed or monospaced face, a stroke far thinner
# than the regular-to-bold stem difference (about 0.05 em).
ROTATION_DEG = 3.0
EM_RANGE = (0.66, 0.72)      # font size as a fraction of the image side
STROKE_EM = 0.008            # the widest extra stroke, as a fraction of the font size
PAPER_RANGE, INK_RANGE = (0.80, 1.0), (0.0, 0.25)
SHADING = 0.08               # the paper's brightness gradient across the image


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def available_fonts() -> list[tuple[str, Path]]:
    """(user name, font file) of every benchmark font this installation has, in FONTS order."""
    folder = font_dir()
    return [(name, folder / file) for name, file in FONTS if (folder / file).is_file()]


def user_fonts(num_users: int) -> list[tuple[str, Path]]:
    fonts = available_fonts()
    if not 1 <= num_users <= len(fonts):
        raise ConfigError(f"data.num_users={num_users}: the fonts dataset has {len(fonts)} users (one per font "
                          f"shipped with matplotlib under {font_dir()}); set data.num_users between 1 and "
                          f"{len(fonts)}.")
    return fonts[:num_users]


@lru_cache(maxsize=64)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _text_mask(font_path: Path, text: str, rng: np.random.Generator, size: int) -> Image.Image:
    """The text's coverage (L, 0-255), scaled, stroked and rotated; at most 92% of the canvas on each side."""
    em = int(round(rng.uniform(*EM_RANGE) * size))
    font = _font(str(font_path), em)
    stroke = int(rng.integers(0, max(1, round(STROKE_EM * em)) + 1))
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    mask = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(mask).text((1 - left, 1 - top), text, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    mask = mask.rotate(float(rng.uniform(-ROTATION_DEG, ROTATION_DEG)), resample=Image.Resampling.BICUBIC, expand=True)
    fit = 0.92 * size / max(mask.size)
    if fit < 1:
        mask = mask.resize((max(1, int(mask.width * fit)), max(1, int(mask.height * fit))),
                           Image.Resampling.LANCZOS)
    return mask


def _tones(rng: np.random.Generator, color: bool) -> tuple[np.ndarray, np.ndarray]:
    """Paper and ink colours: light paper, dark ink, random contrast; in colour mode random hues per image,
    never per user, so colour tells nothing about the user."""
    paper_v, ink_v = rng.uniform(*PAPER_RANGE), rng.uniform(*INK_RANGE)
    if not color:
        return np.full(3, paper_v), np.full(3, ink_v)
    paper = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.35), paper_v)
    ink = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 0.9), ink_v)
    return np.asarray(paper), np.asarray(ink)


def render(font_path: Path, rng: np.random.Generator, resolution: int, text: str = "Ag",
           color: bool = False) -> Image.Image:
    """One image of `text` in the font: grey ("L") or RGB when `color`."""
    size = resolution * SUPERSAMPLE
    mask = _text_mask(font_path, text, rng, size)
    x = int(rng.integers(0, size - mask.width + 1))
    y = int(rng.integers(0, size - mask.height + 1))
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(mask, (x, y))
    alpha = np.asarray(canvas, dtype=np.float64)[..., None] / 255.0
    paper, ink = _tones(rng, color)
    # Uneven lighting: a gentle shading gradient across the paper, in a random direction.
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    direction = rng.uniform(0, 2 * math.pi)
    shade = (1.0 + SHADING * (xx * math.cos(direction) + yy * math.sin(direction)))[..., None]
    pixels = np.clip((paper * shade * (1 - alpha) + ink * alpha) * 255.0, 0, 255).round().astype(np.uint8)
    img = Image.fromarray(pixels, "RGB") if color else Image.fromarray(pixels[..., 0], "L")
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)


def generate(root: str | os.PathLike, num_users: int = 21, images_per_user: int = 64, resolution: int = 32,
             seed: int = 1234, text: str = "Ag", color: bool = False) -> Path:
    """Write root/<font name>/<nnnn>.png once (by one process when several ask at once); deterministic in every
    argument (see the module docstring)."""
    fonts = user_fonts(int(num_users))
    if not text.strip():
        raise ConfigError("data.generate.text is empty: give the fonts dataset something to draw, e.g. 'Ag'.")

    def build(tmp: Path) -> None:
        for name, path in fonts:
            # Each user's images are a function of (seed, the font's name): adding users never changes the others.
            rng = np.random.default_rng([int(seed), *name.encode()])
            (tmp / name).mkdir()
            for i in range(int(images_per_user)):
                render(path, rng, int(resolution), text, bool(color)).save(tmp / name / f"{i:04d}.png")
        (tmp / COMPLETE).write_text("ok\n")

    return build_once(root, build, ready=lambda r: (r / COMPLETE).exists(), directory=True)
