"""Ground-truth labels: every supported format becomes an HxW uint8 index mask, class per pixel, 255 = ignore.

Each format is a LabelFormat class registered by name (see ``registry``); importing this package registers them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.labels import cityscapes as _cityscapes  # noqa: F401  (each module registers its formats)
from pipeline.labels import coco as _coco  # noqa: F401
from pipeline.labels import index_png as _index_png  # noqa: F401
from pipeline.labels import labelme as _labelme  # noqa: F401
from pipeline.labels.base import LabelError, LabelFormat, check_size
from pipeline.labels.cityscapes import CITYSCAPES_CLASSES, cityscapes_label_path
from pipeline.labels.coco import CocoImage
from pipeline.labels.index_png import apply_mapping, decode_label, label_path_for, read_label, reduce_zero_label
from pipeline.labels.registry import get_label_format, list_label_formats, register_label_format
from pipeline.palette import IGNORE_INDEX

if TYPE_CHECKING:
    from pipeline.config import LabelsConfig

__all__ = [
    "CITYSCAPES_CLASSES",
    "CocoImage",
    "LabelError",
    "LabelFormat",
    "apply_mapping",
    "cityscapes_label_path",
    "decode_label",
    "get_label_format",
    "label_format",
    "label_path_for",
    "list_label_formats",
    "read_label",
    "reduce_zero_label",
    "register_label_format",
    "validate_label",
]


def validate_label(label: np.ndarray, height: int, width: int, num_classes: int) -> None:
    """Raise LabelError when the label's size differs from the image or it holds unknown class ids."""
    check_size(*label.shape, height, width)
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise LabelError(
            f"label holds class ids {bad.tolist()[:10]} unknown to the model ({num_classes} classes, 255 = ignore)"
        )


def label_format(cfg: LabelsConfig, dataset_file: bytes | None = None) -> LabelFormat:
    """The LabelFormat for ``cfg`` (whose options LabelsConfig has checked against the format).

    ``dataset_file`` is the bytes of labels_uri for a format with one file for the whole dataset (COCO's JSON).
    """
    return get_label_format(cfg.format).from_config(cfg, dataset_file)
