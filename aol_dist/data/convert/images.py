"""Decode a raw input image once, robustly, and resize it to the shard size.

Handles what real collections hold (``../shared/data/cxr-images/varied``): 8-bit grey, RGB and RGBA PNG,
16-bit grey PNG, palette images, JPEG with and without an EXIF orientation, sides up to a few thousand
pixels. A missing, corrupt or truncated file raises :class:`SkipSample` whose reason names the file;
the converters count and report it (SPEC 8) instead of crashing hours into a conversion.

Aspect ratio (``aspect``): the paper resizes to 256 x 256 (Sec. 5.1), so the default ``stretch`` maps
the whole image onto the square: every pixel is used, horizontal ratios such as the cardiothoracic
ratio are unchanged, and MIMIC's frontal images share one aspect (about 5:6), so the vertical squeeze
is the same for every image. ``pad`` (letterbox with black, the whole image at its true proportions)
and ``crop`` (shorter side to ``size``, centre crop) are offered for datasets with mixed aspects.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from aol_dist.data.shards import SkipSample

ASPECTS = ("stretch", "pad", "crop")
COLORS = ("grey", "rgb")
#: JPEGs are decoded at a reduced scale (DCT scaling, much faster) but never below this many times
#: the target side, so the final Lanczos resize still has enough pixels to anti-alias from.
DRAFT_MARGIN = 2


def load_image(source: str | Path | bytes, size: int, color: str = "grey", aspect: str = "stretch",
               name: str | None = None) -> np.ndarray:
    """File path or encoded bytes -> (size, size) uint8 grey or (size, size, 3) uint8 RGB.

    Raises ``SkipSample("missing_image: <file>")`` or ``SkipSample("unreadable_image: <file> (why)")``.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except FileNotFoundError:
        raise SkipSample(f"missing_image: {label}") from None
    except OSError as e:
        raise SkipSample(f"unreadable_image: {label} ({e.strerror or e})") from None
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) on some damaged files and on large images; we decide here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.format == "JPEG":
                    im.draft("RGB" if color == "rgb" else "L", (size * DRAFT_MARGIN, size * DRAFT_MARGIN))
                im.load()  # a truncated file fails here, not later in a worker's resize
                im = ImageOps.exif_transpose(im)
                im = to_mode(im, color)
                return resize(im, size, aspect)
    except SkipSample:
        raise
    except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, EOFError) as e:
        raise SkipSample(f"unreadable_image: {label} ({type(e).__name__}: {e})") from None


def from_array(array: np.ndarray, size: int, color: str = "grey", aspect: str = "stretch") -> np.ndarray:
    """An in-memory image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> the shard image."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.dtype != np.uint8:
        raise ValueError(f"array images must be uint8, got {a.dtype}")
    mode = {2: "L"}.get(a.ndim) or {3: "RGB", 4: "RGBA"}.get(a.shape[2])
    if mode is None:
        raise ValueError(f"array image of shape {a.shape}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    return resize(to_mode(Image.fromarray(a, mode=mode), color), size, aspect)


def to_mode(im: Image.Image, color: str) -> Image.Image:
    """Any Pillow mode -> ``L`` (grey) or ``RGB``.

    16-bit and float images are scaled by their own maximum (their bit depth is not recorded reliably:
    12-bit data in 16-bit containers is common); transparency is composited over black, the background
    of a radiograph.
    """
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = a.max()
        a = np.zeros_like(a) if top <= 0 else np.clip(a, 0, None) * (255.0 / top)
        im = Image.fromarray(np.rint(a).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    want = "L" if color == "grey" else "RGB"
    return im if im.mode == want else im.convert(want)


def resize(im: Image.Image, size: int, aspect: str = "stretch") -> np.ndarray:
    """Resize to ``size`` x ``size`` with the given aspect policy (see the module docstring)."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
    w, h = im.size
    if (w, h) == (size, size):
        return np.asarray(im, dtype=np.uint8).copy()
    if aspect == "stretch":
        out = im.resize((size, size), Image.Resampling.LANCZOS)
    elif aspect == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        out = Image.new(im.mode, (size, size), 0)
        out.paste(im.resize((nw, nh), Image.Resampling.LANCZOS), ((size - nw) // 2, (size - nh) // 2))
    else:
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        out = im.resize((nw, nh), Image.Resampling.LANCZOS).crop((left, top, left + size, top + size))
    return np.asarray(out, dtype=np.uint8)
