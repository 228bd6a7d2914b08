"""The PASCAL VOC colormap and palette-PNG encoding of class-index masks."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IGNORE_INDEX = 255
IGNORE_COLOR = (224, 224, 192)


def voc_colormap(n: int = 256) -> np.ndarray:
    """VOC colormap: the bits of the class index interleaved into R, G and B.

    Index 255 is the VOC ignore colour (224, 224, 192), as VOC's devkit draws it.
    """
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    if n > IGNORE_INDEX:
        cmap[IGNORE_INDEX] = IGNORE_COLOR
    return cmap


def mask_to_png(mask: np.ndarray, palette: np.ndarray | None = None, compress_level: int = 1) -> bytes:
    """Encode a uint8 class-index mask as a palette PNG (mode P): pixel value = class index."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D uint8 array, got {mask.dtype} {mask.shape}")
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
    pal = voc_colormap() if palette is None else np.asarray(palette, dtype=np.uint8)
    img.putpalette(pal.reshape(-1).tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def png_to_mask(data: bytes) -> np.ndarray:
    """Decode an index PNG (mode P or L) to its class indices, never through RGB."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(f"an index mask must be mode P or L, got mode {img.mode}")
        return np.asarray(img, dtype=np.uint8).copy()
