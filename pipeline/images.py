"""Decoding image bytes to RGB arrays, the way cameras and editors mean them."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")

# The guard is the job's max_image_pixels, read from the header (labels: their image's size) before decoding.
Image.MAX_IMAGE_PIXELS = None

STRIP_PIXELS = 4_000_000
"""Pixels converted to RGB at a time: the only full-size arrays are Pillow's decoded image and the output."""

CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")

# EXIF orientation -> the numpy view that displays the image upright (as ImageOps.exif_transpose does).
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda a: np.rot90(a, -1),  # ROTATE_270 (a quarter turn clockwise)
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),  # ROTATE_90
}


class DecodeError(ValueError):
    """Bytes that are not a decodable image; the message is the reason written to the error row."""


class ImageTooLarge(DecodeError):
    """An image whose header gives more pixels than the job's max_image_pixels; it is never decoded."""


def image_pixels(data: bytes) -> int | None:
    """width * height from the header alone (nothing decoded); None when the header cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except (OSError, SyntaxError, ValueError):
        return None
    return width * height


def decode_rgb(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Decode to a C-contiguous, writable HxWx3 uint8 array: EXIF orientation applied; L, RGBA, P, CMYK, I;16...
    converted to RGB. ImageTooLarge, before any decoding, when the image has more than ``max_pixels`` pixels."""
    if not data:
        raise DecodeError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(
                    f"image is {width}x{height} = {width * height:,} pixels, above max_image_pixels "
                    f"({max_pixels:,}); raise max_image_pixels in the job config (--max-image-pixels) to segment it"
                )
            img.load()  # a truncated file fails here, not later
            orient = _ORIENT.get(img.getexif().get(0x0112, 1))
            out = _to_rgb(img)
            img.close()  # frees Pillow's decoded image before the oriented copy (leaving ``with`` does not)
    except DecodeError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DecodeError(f"cannot decode image: {e}") from e
    return np.ascontiguousarray(orient(out)) if orient else out


def _to_rgb(img: Image.Image) -> np.ndarray:
    """The loaded image as HxWx3 uint8, converted strip by strip into one preallocated array."""
    width, height = img.size
    out = np.empty((height, width, 3), np.uint8)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Alpha is dropped, as torchvision's read_image(mode=RGB) does.
        def convert(strip: Image.Image) -> np.ndarray:
            return np.asarray(strip.convert("RGBA").convert("RGB"))
    elif img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # Scaled to 0..255 by the full range (integers) or the image's maximum (floats), then gray.
        top = 65535.0 if img.mode.startswith("I") else max(float(img.getextrema()[1]), 1.0)

        def convert(strip: Image.Image) -> np.ndarray:
            gray = np.clip(np.asarray(strip, dtype=np.float64) / top * 255.0, 0, 255).astype(np.uint8)
            return gray[..., None]
    else:

        def convert(strip: Image.Image) -> np.ndarray:
            return np.asarray(strip if strip.mode == "RGB" else strip.convert("RGB"))

    rows = max(1, STRIP_PIXELS // max(width, 1))
    for y in range(0, height, rows):
        out[y : y + rows] = convert(img.crop((0, y, width, min(y + rows, height))))
    return out


def memory_limit_bytes() -> int:
    """The memory this process may use: physical memory, or a smaller cgroup (container) limit if one is set."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_MEMORY_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        # "max" (v2) or a huge number (v1, about 2**63) means no limit; neither is below physical memory.
        if text.isdigit() and 0 < int(text) < limit:
            limit = int(text)
    return limit


def default_max_image_pixels() -> int:
    """The default max_image_pixels: what this process's memory can decode."""
    # Decoding peaks near 7 bytes/pixel (Pillow's 4 plus our 3), plus the 1-byte mask; an actor may hold two
    # shards' images at once: 16 bytes per pixel.
    return memory_limit_bytes() // 16
