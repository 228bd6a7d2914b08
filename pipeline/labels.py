"""Ground-truth labels: index PNGs (mode P or L) where the value is the class and 255 is ignore."""

from __future__ import annotations

import posixpath

import fsspec
import numpy as np

from pipeline.palette import IGNORE_INDEX, png_to_mask


class LabelError(ValueError):
    """A label that cannot be compared with its image; the message goes into the error row."""


def label_path_for(rel_image_path: str) -> str:
    """The label's path relative to the labels root: the image's relative path with a .png suffix."""
    return f"{posixpath.splitext(rel_image_path)[0]}.png"


def decode_label(data: bytes) -> np.ndarray:
    try:
        return png_to_mask(data)
    except (OSError, ValueError, SyntaxError) as e:
        raise LabelError(f"cannot decode label: {e}") from e


def read_label(fs: fsspec.AbstractFileSystem, path: str) -> np.ndarray:
    return decode_label(fs.cat_file(path))


def validate_label(label: np.ndarray, height: int, width: int, num_classes: int) -> None:
    """Raise LabelError when the label's size differs from the image or it holds unknown class ids."""
    if label.shape != (height, width):
        raise LabelError(f"label is {label.shape[1]}x{label.shape[0]} but the image is {width}x{height}")
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise LabelError(
            f"label holds class ids {bad.tolist()[:10]} unknown to the model ({num_classes} classes, 255 = ignore)"
        )
