"""Decoding image bytes to RGB arrays, the way cameras and editors mean them."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")

# A decompression bomb is an error row, not a hang: Pillow raises past twice this many pixels.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000


class DecodeError(ValueError):
    """Bytes that are not a decodable image; the message is the reason written to the error row."""


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode to an HxWx3 uint8 array: EXIF orientation applied; L, RGBA, P, CMYK, I;16... converted to RGB."""
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # a truncated file fails here, not later
                img = ImageOps.exif_transpose(img)
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    # Alpha is dropped, as torchvision's read_image(mode=RGB) does.
                    img = img.convert("RGBA").convert("RGB")
                elif img.mode.startswith("I;16") or img.mode in ("I", "F"):
                    arr = np.asarray(img, dtype=np.float64)
                    top = 65535.0 if img.mode.startswith("I") else max(float(arr.max()), 1.0)
                    img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
                elif img.mode != "RGB":
                    img = img.convert("RGB")
                return np.asarray(img, dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"cannot decode image: {e}") from e
