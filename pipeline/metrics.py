"""Exact segmentation metrics from int64 confusion matrices, split into update and compute.

n[i, j] counts pixels of ground-truth class i predicted as class j; the ignore
label never enters the matrix. Definitions follow Long, Shelhamer and Darrell
(FCN, 2015). A class with no ground-truth and no predicted pixel has 0/0 for its
ratios: it is NaN and left out of every mean, as mmsegmentation does.
"""

from __future__ import annotations

import numpy as np

from pipeline.palette import IGNORE_INDEX

DEFINITIONS = {
    "confusion_matrix": "n[i][j] = pixels of ground-truth class i predicted as class j; "
    "ground-truth pixels equal to the ignore index are excluded",
    "pixel_accuracy": "sum_i n_ii / sum_i t_i, with t_i = sum_j n_ij",
    "mean_accuracy": "mean over classes of n_ii / t_i",
    "mean_iou": "mean over classes of n_ii / (t_i + sum_j n_ji - n_ii)",
    "frequency_weighted_iou": "(sum_k t_k)^-1 * sum_i t_i * n_ii / (t_i + sum_j n_ji - n_ii)",
    "iou": "n_ii / (t_i + sum_j n_ji - n_ii)",
    "dice": "2 n_ii / (t_i + sum_j n_ji)",
    "precision": "n_ii / sum_j n_ji",
    "recall": "n_ii / t_i",
    "nan_policy": "a per-class ratio whose denominator is 0 is NaN (null in JSON) and is left out of the "
    "means (as mmsegmentation does). PaddleSeg counts such a class as 0 instead, and torchvision's "
    "reference ConfusionMatrix returns NaN for the whole mean; both differ from these figures only "
    "when a class is absent from ground truth or prediction.",
}


BLOCK_PIXELS = 4_000_000
"""Pixels counted at a time: the int64 indices of a block, never of a whole (possibly 400 Mpx) label."""


def confusion_counts(
    gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """The [C, C] int64 confusion matrix of one label/prediction pair (bincount, as torchvision does); a pixel
    whose label or prediction is ``ignore_index`` (no data: a windowed image's nodata) is in no cell."""
    gt = np.asarray(gt).reshape(-1)
    pred = np.asarray(pred).reshape(-1)
    if gt.size != pred.size:
        raise ValueError(f"label has {gt.size} pixels but the prediction {pred.size}")
    counts = np.zeros(num_classes * num_classes, np.int64)
    for start in range(0, gt.size, BLOCK_PIXELS):
        g, p = gt[start : start + BLOCK_PIXELS], pred[start : start + BLOCK_PIXELS]
        keep = (g != ignore_index) & (p != ignore_index)
        idx = g[keep].astype(np.int64) * num_classes + p[keep].astype(np.int64)
        counts += np.bincount(idx, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class ConfusionMatrix:
    """Accumulates an exact int64 confusion matrix; the sum is independent of update order and grouping."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.mat = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray, ignore_index: int = IGNORE_INDEX) -> None:
        self.mat += confusion_counts(gt, pred, self.num_classes, ignore_index)

    def update_sparse(self, gt: np.ndarray, pred: np.ndarray, count: np.ndarray) -> None:
        """Add cells given as parallel arrays (the per-image sparse form stored in Parquet)."""
        np.add.at(self.mat, (np.asarray(gt, np.int64), np.asarray(pred, np.int64)), np.asarray(count, np.int64))

    def compute(self) -> dict:
        return compute_metrics(self.mat)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def compute_metrics(mat: np.ndarray) -> dict:
    """Dataset metrics and per-class metrics from a confusion matrix (rows ground truth)."""
    mat = np.asarray(mat, dtype=np.int64)
    tp = np.diag(mat)
    gt_total = mat.sum(axis=1)  # t_i
    pred_total = mat.sum(axis=0)  # sum_j n_ji
    union = gt_total + pred_total - tp
    iou = _ratio(tp, union)
    total = int(gt_total.sum())
    fw = float((gt_total[union > 0] * iou[union > 0]).sum() / total) if total else float("nan")
    return {
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "mean_accuracy": _nanmean(_ratio(tp, gt_total)),
        "mean_iou": _nanmean(iou),
        "frequency_weighted_iou": fw,
        "labeled_pixels": total,
        "per_class": {
            "iou": iou.tolist(),
            "dice": _ratio(2 * tp, gt_total + pred_total).tolist(),
            "precision": _ratio(tp, pred_total).tolist(),
            "recall": _ratio(tp, gt_total).tolist(),
            "gt_pixels": gt_total.tolist(),
            "pred_pixels": pred_total.tolist(),
        },
    }


def metrics_report(mat: np.ndarray, class_names: list[str]) -> dict:
    """The body of a metrics.json: dataset metrics, per-class metrics by class name, and the definitions."""
    metrics = compute_metrics(mat)
    per_class = metrics.pop("per_class")
    return {
        "class_names": list(class_names),
        "ignore_index": IGNORE_INDEX,
        **metrics,
        "per_class": {name: {k: v[i] for k, v in per_class.items()} for i, name in enumerate(class_names)},
        "definitions": DEFINITIONS,
    }
