"""Images blended with their masks (PaddleSeg's ``added_prediction``), and the report's error maps.

Pure functions on arrays; the callers read and write.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.palette import IGNORE_INDEX

FALSE_POSITIVE = (230, 40, 40)  # red: a class predicted where the ground truth is background (class 0)
FALSE_NEGATIVE = (40, 110, 240)  # blue: a ground-truth object pixel given another class, or missed


def blend(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, opacity: float) -> np.ndarray:
    """HxWx3 uint8: ``image`` with each pixel's class colour laid over it at ``opacity`` (0..1)."""
    colours = palette[mask].astype(np.float32)
    return (image.astype(np.float32) * (1.0 - opacity) + colours * opacity).round().astype(np.uint8)


def overlay_jpeg(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, opacity: float) -> bytes:
    """The blend of ``image`` and ``mask`` as a JPEG, what ``overlays/<image_id>.jpg`` holds."""
    return encode(Image.fromarray(blend(image, mask, palette, opacity)), "JPEG")


def error_map(image: np.ndarray | None, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """HxWx3 uint8: the image darkened to grey (black without one), false positives and false negatives in
    two colours; pixels the ground truth ignores stay grey."""
    if image is None:
        out = np.zeros((*truth.shape, 3), np.uint8)
    else:
        grey = (image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) * 0.45
        out = np.repeat(grey.round().astype(np.uint8)[..., None], 3, axis=2)
    wrong = (prediction != truth) & (truth != IGNORE_INDEX)
    out[wrong & (truth == 0)] = FALSE_POSITIVE
    out[wrong & (truth != 0)] = FALSE_NEGATIVE
    return out


def thumbnail(rgb: np.ndarray, side: int, nearest: bool = False) -> Image.Image:
    """``rgb`` fitted into ``side`` x ``side``; nearest-neighbour for masks, so classes do not mix."""
    picture = Image.fromarray(rgb)
    picture.thumbnail((side, side), Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR)
    return picture


def encode(picture: Image.Image, fmt: str = "PNG", quality: int = 85) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()
