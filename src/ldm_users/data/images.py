"""Decode one image file of any common format into an RGB uint8 array at the training resolution.

Every odd case a real folder of images contains is handled here, in one place: EXIF rotation, 16-bit
and palette/alpha images, CMYK, animated GIFs (first frame), and decompression bombs (refused).
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".pbm", ".webp", ".gif", ".tif", ".tiff"}

# Refuse images above this many pixels before decoding them (a 20k x 20k PNG of zeros is a few KB on disk).
DEFAULT_MAX_PIXELS = 64_000_000


class BadImage(Exception):
    """The file cannot be used as a training image; the message says why."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit grayscale: scale the real range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")  # keeps palette transparency
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, RGBA-composited...


def resize_center_crop(img: Image.Image, resolution: int, center_crop: bool = True) -> Image.Image:
    """Shortest side to `resolution`, then a centred square crop (or a squash when center_crop is false)."""
    if not center_crop:
        return img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def load_image(path, resolution: int, center_crop: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_size: int = 8) -> tuple[np.ndarray, tuple[int, int]]:
    """Return (HxWx3 uint8 array, original (w, h)). Raises BadImage with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise BadImage(f"{w}x{h} pixels exceeds the limit of {max_pixels} (decompression bomb?)")
                if min(w, h) < min_size:
                    raise BadImage(f"{w}x{h} is smaller than the minimum usable size {min_size}px")
                if getattr(img, "is_animated", False):
                    img.seek(0)  # animated GIF/WebP: the first frame
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"refused as a decompression bomb: {err}") from None
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError, EOFError) as err:
        raise BadImage(f"cannot decode: {type(err).__name__}: {err}") from None
    out = resize_center_crop(rgb, resolution, center_crop)
    return np.asarray(out, dtype=np.uint8), (w, h)
