"""Per-image statistics: class pixel counts, and the metrics and sparse confusion counts against a label."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.metrics import BLOCK_PIXELS, compute_metrics, confusion_counts
from pipeline.palette import IGNORE_INDEX


def class_pixels(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels per class, a block at a time: bincount widens its input to int64 (8 bytes per mask pixel)."""
    flat = mask.reshape(-1)
    counts = np.zeros(max(num_classes, 256), np.int64)
    for start in range(0, flat.size, BLOCK_PIXELS):
        counts += np.bincount(flat[start : start + BLOCK_PIXELS], minlength=counts.size)
    return counts[:num_classes]


def sparse_confusion(mat: np.ndarray) -> list[dict]:
    """The non-zero cells of a confusion matrix: enough to re-reduce any subset of images exactly."""
    gt, pred = np.nonzero(mat)
    return [{"gt": int(i), "pred": int(j), "count": int(mat[i, j])} for i, j in zip(gt, pred, strict=True)]


@dataclass(frozen=True, kw_only=True)
class ImageStats:
    """The statistics columns of one image's ImageRow."""

    class_pixels: list[int]
    class_fraction: list[float]
    labeled: bool
    pixel_accuracy: float | None
    mean_iou: float | None
    confusion: list[dict] | None
    nodata_pixels: int  # pixels without data (mask 255): in no class and no fraction

    def columns(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class ImageStatsAccumulator:
    """One image's statistics, updated band of rows by band of rows (a huge image's mask is never whole) and
    computed once. Predicted 255 is a pixel without data: no class, left out of fractions and confusion."""

    def __init__(self, num_classes: int, labeled: bool) -> None:
        self.num_classes = num_classes
        self.pixels = np.zeros(num_classes, np.int64)
        self.nodata = 0
        self.mat = np.zeros((num_classes, num_classes), np.int64) if labeled else None

    def update(self, mask: np.ndarray, label: np.ndarray | None = None) -> None:
        """Add rows of the predicted ``mask`` (and the same rows of the label when the image has one)."""
        counts = class_pixels(mask, IGNORE_INDEX + 1)
        self.pixels += counts[: self.num_classes]
        self.nodata += int(counts[IGNORE_INDEX])
        if self.mat is not None:
            self.mat += confusion_counts(label, mask, self.num_classes)

    def compute(self) -> ImageStats:
        m = compute_metrics(self.mat) if self.mat is not None else {}
        return ImageStats(
            class_pixels=self.pixels.tolist(),
            class_fraction=(self.pixels / max(int(self.pixels.sum()), 1)).astype(np.float32).tolist(),
            labeled=self.mat is not None,
            pixel_accuracy=_finite(m.get("pixel_accuracy")),
            mean_iou=_finite(m.get("mean_iou")),
            confusion=sparse_confusion(self.mat) if self.mat is not None else None,
            nodata_pixels=self.nodata,
        )


def image_stats(mask: np.ndarray, num_classes: int, label: np.ndarray | None) -> ImageStats:
    """Class counts of the predicted ``mask``; with a ``label``, its metrics and sparse confusion counts."""
    acc = ImageStatsAccumulator(num_classes, label is not None)
    acc.update(mask, label)
    return acc.compute()


def _finite(v: float | None) -> float | None:
    return None if v is None or np.isnan(v) else v
