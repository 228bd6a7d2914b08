"""Per-image statistics: class pixel counts, and the metrics and sparse confusion counts against a label."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.metrics import BLOCK_PIXELS, compute_metrics, confusion_counts


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

    def columns(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def image_stats(mask: np.ndarray, num_classes: int, label: np.ndarray | None) -> ImageStats:
    """Class counts of the predicted ``mask``; with a ``label``, its metrics and sparse confusion counts."""
    pixels = class_pixels(mask, num_classes)
    mat = confusion_counts(label, mask, num_classes) if label is not None else None
    m = compute_metrics(mat) if mat is not None else {}
    return ImageStats(
        class_pixels=pixels.tolist(),
        class_fraction=(pixels / max(mask.size, 1)).astype(np.float32).tolist(),
        labeled=mat is not None,
        pixel_accuracy=_finite(m.get("pixel_accuracy")),
        mean_iou=_finite(m.get("mean_iou")),
        confusion=sparse_confusion(mat) if mat is not None else None,
    )


def _finite(v: float | None) -> float | None:
    return None if v is None or np.isnan(v) else v
