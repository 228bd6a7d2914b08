"""Index PNGs (VOC, ADE20K) and binary 0/255 masks: the pixel value is the class, 255 is ignore."""

from __future__ import annotations

import io
import posixpath
from typing import TYPE_CHECKING

import fsspec
import numpy as np
from PIL import Image

from pipeline.labels.base import LabelError, LabelFormat, check_size
from pipeline.labels.registry import register_label_format
from pipeline.palette import IGNORE_INDEX, png_to_mask

if TYPE_CHECKING:
    from pipeline.config import LabelsConfig

BINARY_MAPPING = {0: 0, 255: 1}


def label_path_for(rel_image_path: str) -> str:
    """The label's path relative to the labels root: the image's relative path with a .png suffix."""
    return f"{posixpath.splitext(rel_image_path)[0]}.png"


def check_header_size(data: bytes, height: int, width: int) -> None:
    """Raise LabelError when the label's header gives another size than the image's, before any pixel is
    decoded: Pillow's own pixel limit is off (see pipeline.images), so this keeps a huge label from being loaded."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            label_width, label_height = img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise LabelError(f"cannot decode label: {e}") from e
    check_size(label_height, label_width, height, width)


def decode_label(data: bytes) -> np.ndarray:
    """Decode an index PNG (mode P or L) to its values."""
    try:
        return png_to_mask(data)
    except (OSError, ValueError, SyntaxError) as e:
        raise LabelError(f"cannot decode label: {e}") from e


def read_label(fs: fsspec.AbstractFileSystem, path: str) -> np.ndarray:
    return decode_label(fs.cat_file(path))


def apply_mapping(mask: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Map each raw value through ``mapping`` with a 256-entry lookup table.

    255 stays 255 unless the mapping names it; any other value absent from the mapping is a LabelError.
    Keys above 255 cannot occur in a uint8 label and are ignored.
    """
    lut = np.full(256, -1, np.int16)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    for raw, cls in mapping.items():
        if raw <= 255:
            lut[raw] = cls
    values = np.unique(mask)
    missing = values[lut[values] < 0]
    if missing.size:
        raise LabelError(f"label value(s) {missing.tolist()[:10]} not in labels.mapping")
    return lut.astype(np.uint8)[mask]


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """mmsegmentation's reduce_zero_label: 0 becomes 255 (ignore), every other value - 1, 255 stays 255."""
    out = mask.copy()
    out[out == 0] = 255
    out -= 1
    out[out == 254] = 255
    return out


def decode_binary(data: bytes) -> np.ndarray:
    """Decode a binary mask PNG (mode 1, L or P) whose values must be 0 and 255 only."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            mode, mask = img.mode, np.asarray(img).copy()
    except (OSError, ValueError, SyntaxError) as e:
        raise LabelError(f"cannot decode label: {e}") from e
    if mode not in ("1", "L", "P"):
        raise LabelError(f"a binary mask must be mode 1, L or P, got mode {mode}")
    mask = mask.astype(np.uint8) * 255 if mode == "1" else mask
    bad = np.setdiff1d(np.unique(mask), (0, 255))
    if bad.size:
        raise LabelError(f"a binary mask holds only 0 and 255, got values {bad.tolist()[:10]}")
    return mask


@register_label_format("index_png")
class IndexPngFormat(LabelFormat):
    """``<stem>.png`` index PNGs; an optional value mapping, then optional reduce_zero_label."""

    options = frozenset({"mapping", "reduce_zero_label"})

    def __init__(self, mapping: dict[int, int] | None = None, reduce_zero: bool = False):
        self.mapping = mapping
        self.reduce_zero = reduce_zero

    @classmethod
    def from_config(cls, cfg: LabelsConfig, dataset_file: bytes | None) -> IndexPngFormat:
        return cls(cfg.mapping, cfg.reduce_zero_label)

    def path_for(self, image_rel: str) -> str:
        return label_path_for(image_rel)

    def to_mask(self, payload: bytes, height: int, width: int) -> np.ndarray:
        check_header_size(payload, height, width)
        mask = decode_label(payload)
        check_size(*mask.shape, height, width)
        if self.mapping is not None:
            mask = apply_mapping(mask, self.mapping)
        return reduce_zero_label(mask) if self.reduce_zero else mask


@register_label_format("binary")
class BinaryFormat(LabelFormat):
    """``<stem>.png`` 0/255 masks mapped to classes, by default 0 -> 0 and 255 -> 1 (255 is not ignore here)."""

    options = frozenset({"mapping"})

    def __init__(self, mapping: dict[int, int] | None = None):
        self.mapping = BINARY_MAPPING if mapping is None else mapping

    @classmethod
    def from_config(cls, cfg: LabelsConfig, dataset_file: bytes | None) -> BinaryFormat:
        return cls(cfg.mapping)

    def path_for(self, image_rel: str) -> str:
        return label_path_for(image_rel)

    def to_mask(self, payload: bytes, height: int, width: int) -> np.ndarray:
        check_header_size(payload, height, width)
        mask = decode_binary(payload)
        check_size(*mask.shape, height, width)
        return apply_mapping(mask, self.mapping)
