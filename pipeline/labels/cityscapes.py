"""Cityscapes ``*_gtFine_labelIds.png`` labels, converted to the 19 trainIds used for training and evaluation."""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING

import numpy as np

from pipeline.labels.base import LabelError, LabelFormat, check_size
from pipeline.labels.index_png import check_header_size, decode_label
from pipeline.labels.registry import register_label_format

if TYPE_CHECKING:
    from pipeline.config import LabelsConfig

# (name, labelId, trainId) from cityscapesScripts' helpers/labels.py; trainId 255 and -1 are not trained on.
CITYSCAPES_LABELS: tuple[tuple[str, int, int], ...] = (
    ("unlabeled", 0, 255),
    ("ego vehicle", 1, 255),
    ("rectification border", 2, 255),
    ("out of roi", 3, 255),
    ("static", 4, 255),
    ("dynamic", 5, 255),
    ("ground", 6, 255),
    ("road", 7, 0),
    ("sidewalk", 8, 1),
    ("parking", 9, 255),
    ("rail track", 10, 255),
    ("building", 11, 2),
    ("wall", 12, 3),
    ("fence", 13, 4),
    ("guard rail", 14, 255),
    ("bridge", 15, 255),
    ("tunnel", 16, 255),
    ("pole", 17, 5),
    ("polegroup", 18, 255),
    ("traffic light", 19, 6),
    ("traffic sign", 20, 7),
    ("vegetation", 21, 8),
    ("terrain", 22, 9),
    ("sky", 23, 10),
    ("person", 24, 11),
    ("rider", 25, 12),
    ("car", 26, 13),
    ("truck", 27, 14),
    ("bus", 28, 15),
    ("caravan", 29, 255),
    ("trailer", 30, 255),
    ("train", 31, 16),
    ("motorcycle", 32, 17),
    ("bicycle", 33, 18),
    ("license plate", -1, -1),
)

CITYSCAPES_CLASSES: list[str] = [
    name for name, _, train_id in sorted(CITYSCAPES_LABELS, key=lambda lab: lab[2]) if 0 <= train_id < 255
]

NUM_LABEL_IDS = 34


def _train_id_table() -> np.ndarray:
    """labelId -> trainId lookup table for labelIds 0..33 (license plate, id -1, never occurs in a label PNG)."""
    table = np.full(NUM_LABEL_IDS, 255, np.uint8)
    for _, label_id, train_id in CITYSCAPES_LABELS:
        if label_id >= 0:
            table[label_id] = train_id
    return table


_TRAIN_IDS = _train_id_table()


def cityscapes_label_path(rel_image_path: str) -> str:
    """``<dir>/<stem>_leftImg8bit.<ext>`` -> ``<dir>/<stem>_gtFine_labelIds.png``; other names just get the suffix."""
    stem = posixpath.splitext(rel_image_path)[0].removesuffix("_leftImg8bit")
    return f"{stem}_gtFine_labelIds.png"


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map labelIds (0..33) to trainIds (0..18, 255 = ignore); any other value is a LabelError."""
    values = np.unique(label_ids)
    bad = values[values >= NUM_LABEL_IDS]
    if bad.size:
        raise LabelError(f"Cityscapes labelIds are 0..{NUM_LABEL_IDS - 1}, got {bad.tolist()[:10]}")
    return _TRAIN_IDS[label_ids]


@register_label_format("cityscapes")
class CityscapesFormat(LabelFormat):
    """``*_gtFine_labelIds.png`` next to the image's relative path, read as trainIds."""

    @classmethod
    def from_config(cls, cfg: LabelsConfig, dataset_file: bytes | None) -> CityscapesFormat:
        return cls()

    def path_for(self, image_rel: str) -> str:
        return cityscapes_label_path(image_rel)

    def to_mask(self, payload: bytes, height: int, width: int) -> np.ndarray:
        check_header_size(payload, height, width)
        mask = decode_label(payload)
        check_size(*mask.shape, height, width)
        return label_ids_to_train_ids(mask)

    def class_names(self) -> list[str]:
        return list(CITYSCAPES_CLASSES)
