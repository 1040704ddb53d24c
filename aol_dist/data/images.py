"""Image entries of a shard: encoding at conversion (8-bit grey or RGB, PNG or JPEG) and decoding in the reader.

Decoding is on the training path of every sample: 8-bit grey and RGB PNGs (everything the converters write
as PNG) go through torchvision's libpng decoder, faster than PIL on small images (a 32 x 32 CIFAR RGB image
82 against 405 us, a 32 x 32 grey one 42 against 72 us, measured here) and on par at 256 x 256 grey (790
against 770 us); any other PNG and every JPEG take PIL's path, the reference the fast path is tested
against (tests/test_shards.py).
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

IMAGE_FORMATS = ("png", "jpg")
#: JPEG quality of ``image_format="jpg"``: visually lossless for radiographs, ~4x faster to decode than PNG.
JPEG_QUALITY = 95


def encode_image(image: np.ndarray, image_format: str = "png", key: str = "?") -> bytes:
    """(H, W) grey or (H, W, 3) RGB uint8 -> PNG (lossless) or JPEG bytes, in the image's own mode."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"sample {key}: image must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"sample {key}: image format {image_format!r} not in {IMAGE_FORMATS}")
    buf = io.BytesIO()
    pil = Image.fromarray(image, mode="L" if image.ndim == 2 else "RGB")
    if image_format == "png":
        pil.save(buf, format="PNG", compress_level=1)
    else:  # fixed settings so a re-run writes the same bytes
        pil.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0 if image.ndim == 3 else -1)
    return buf.getvalue()


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: IHDR colour types of the fast path: 0 grey, 2 RGB (bit depth 8).
_FAST_PNG = {0: 1, 2: 3}


def decode_image(data: bytes) -> np.ndarray:
    """Image entry -> (H, W) uint8 for grey, (H, W, 3) uint8 for RGB (shards hold only these two modes;
    anything else is read as grey)."""
    decode_png = _libpng()
    if decode_png and data[:8] == PNG_SIGNATURE and len(data) > 25 and data[24] == 8 and data[25] in _FAST_PNG:
        import torch

        image = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        if image.shape[0] == _FAST_PNG[data[25]]:
            return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
    return decode_image_pil(data)


def decode_image_pil(data: bytes) -> np.ndarray:
    """:func:`decode_image` through PIL: any format PIL reads."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "RGB"):
            im = im.convert("L")
        return np.asarray(im, dtype=np.uint8)


@functools.cache
def _libpng():
    """torchvision's libpng decoding op, or None. torchvision 0.29 marks its image codecs deprecated (in favour
    of torchcodec, not a dependency here) and its ``decode_png`` warns on every call, so the op it wraps is
    called directly, with the same arguments; where a later release drops it, every image takes PIL's path."""
    try:
        import torch
        import torchvision.io  # noqa: F401 - loads the image extension that registers the op

        op = torch.ops.image.decode_png
    except (ImportError, AttributeError, RuntimeError):
        return None
    unchanged = torchvision.io.ImageReadMode.UNCHANGED.value
    return lambda data: op(data, unchanged, False)  # (input, mode, apply_exif_orientation), as decode_png calls it


def image_entry(raw: dict[str, bytes]) -> bytes:
    """The image bytes of a raw tar sample, whichever format it was written in."""
    for suffix in IMAGE_FORMATS:
        if suffix in raw:
            return raw[suffix]
    raise KeyError("png or jpg")
