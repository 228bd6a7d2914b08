"""Per-image statistics: class pixel counts, confidence, and the sparse confusion counts against a label."""

from __future__ import annotations

import numpy as np

from pipeline.metrics import compute_metrics, confusion_counts


def class_pixels(mask: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(mask.reshape(-1), minlength=num_classes)[:num_classes].astype(np.int64)


def sparse_confusion(mat: np.ndarray) -> list[dict]:
    """The non-zero cells of a confusion matrix: enough to re-reduce any subset of images exactly."""
    gt, pred = np.nonzero(mat)
    return [{"gt": int(i), "pred": int(j), "count": int(mat[i, j])} for i, j in zip(gt, pred, strict=True)]


def image_stats(mask: np.ndarray, num_classes: int, label: np.ndarray | None) -> dict:
    """The statistics columns of one image's row (see outputs.STATS_SCHEMA)."""
    pixels = class_pixels(mask, num_classes)
    row = {
        "class_pixels": pixels.tolist(),
        "class_fraction": (pixels / max(mask.size, 1)).astype(np.float32).tolist(),
        "labeled": label is not None,
        "pixel_accuracy": None,
        "mean_iou": None,
        "confusion": None,
    }
    if label is not None:
        mat = confusion_counts(label, mask, num_classes)
        m = compute_metrics(mat)
        row["pixel_accuracy"] = None if np.isnan(m["pixel_accuracy"]) else m["pixel_accuracy"]
        row["mean_iou"] = None if np.isnan(m["mean_iou"]) else m["mean_iou"]
        row["confusion"] = sparse_confusion(mat)
    return row
