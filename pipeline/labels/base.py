"""What every label format shares: the per-image error and the LabelFormat interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from pipeline.config import LabelsConfig


class LabelError(ValueError):
    """A label that cannot be compared with its image; the message goes into the error row."""


def check_size(label_height: int, label_width: int, height: int, width: int) -> None:
    """Raise LabelError when the label's size differs from the image's."""
    if (label_height, label_width) != (height, width):
        raise LabelError(f"label is {label_width}x{label_height} but the image is {width}x{height}")


class LabelFormat(ABC):
    """One ground-truth encoding: where an image's label is and how it becomes an index mask (255 = ignore)."""

    per_image: ClassVar[bool] = True
    """True: labels_uri is a folder, one label file per image, found with path_for; False: labels_uri is one
    dataset file (COCO's JSON) for every image, searched with lookup."""
    options: ClassVar[frozenset[str]] = frozenset()
    """The LabelsConfig options it uses (mapping, reduce_zero_label, classes); setting any other is an error."""
    required_options: ClassVar[dict[str, str]] = {}
    """Options it cannot do without -> what they hold, for the error: {"classes": "the class names"}."""

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: LabelsConfig, dataset_file: bytes | None) -> LabelFormat:
        """The format as ``cfg`` sets it up (LabelsConfig has checked the options); ``dataset_file`` is the bytes
        of labels_uri for a format that is not ``per_image``, else None."""

    @abstractmethod
    def path_for(self, image_rel: str) -> str | None:
        """The label file's path relative to the labels root (loose-files layout); None for dataset-wide formats."""

    def lookup(self, name: str) -> Any:
        """A dataset-wide format's entry for the image called ``name``, or None when it has no label."""
        raise TypeError(f"{type(self).__name__} has one label file per image: use path_for")

    @abstractmethod
    def to_mask(self, payload: Any, height: int, width: int) -> np.ndarray:
        """The HxW uint8 index mask from a label file's bytes (or a lookup entry); LabelError says why not."""

    def class_names(self) -> list[str] | None:
        """Class names by index when the format defines them."""
        return None
