"""Ground-truth labels: every supported format becomes an HxW uint8 index mask, class per pixel, 255 = ignore."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import ConfigError
from pipeline.labels.base import LabelError, LabelFormat, check_size
from pipeline.labels.cityscapes import CITYSCAPES_CLASSES, CityscapesFormat, cityscapes_label_path
from pipeline.labels.coco import CocoFormat, CocoImage, CocoIndex
from pipeline.labels.index_png import (
    BinaryFormat,
    IndexPngFormat,
    apply_mapping,
    decode_label,
    label_path_for,
    read_label,
    reduce_zero_label,
)
from pipeline.labels.labelme import LabelmeFormat
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
    "label_format",
    "label_path_for",
    "read_label",
    "reduce_zero_label",
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


def label_format(cfg: LabelsConfig, dataset_json: bytes | None = None) -> LabelFormat:
    """The LabelFormat for ``cfg`` (whose fields LabelsConfig has checked against the format).

    ``dataset_json`` is the COCO instances JSON, required for format coco.
    """
    if cfg.format == "index_png":
        return IndexPngFormat(cfg.mapping, cfg.reduce_zero_label)
    if cfg.format == "binary":
        return BinaryFormat(cfg.mapping)
    if cfg.format == "cityscapes":
        return CityscapesFormat()
    if cfg.format == "labelme":
        return LabelmeFormat(cfg.classes)  # LabelsConfig requires classes for labelme
    if dataset_json is None:
        raise ConfigError("labels.format coco needs the COCO instances JSON")
    return CocoFormat(CocoIndex.from_json(dataset_json), cfg.mapping)
