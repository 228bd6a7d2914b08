"""Metrics from confusion matrices: hand-worked values, NaN policy, ignore label, and agreement
with torchvision's reference formula and torchmetrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import metrics
from pipeline.metrics import ConfusionMatrix, compute_metrics, confusion_counts
from pipeline.stats import sparse_confusion


def test_hand_worked_3x3():
    # rows: ground truth, columns: prediction
    mat = np.array([[5, 2, 1], [1, 6, 3], [0, 2, 7]], dtype=np.int64)
    # t (row sums) = 8, 10, 9 (total 27); column sums = 6, 10, 11; diagonal = 5, 6, 7
    m = compute_metrics(mat)
    iou = [5 / (8 + 6 - 5), 6 / (10 + 10 - 6), 7 / (9 + 11 - 7)]
    recall = [5 / (5 + 2 + 1), 6 / (1 + 6 + 3), 7 / (0 + 2 + 7)]
    precision = [5 / (5 + 1 + 0), 6 / (2 + 6 + 2), 7 / (1 + 3 + 7)]
    dice = [2 * 5 / (8 + 6), 2 * 6 / (10 + 10), 2 * 7 / (9 + 11)]
    assert m["pixel_accuracy"] == pytest.approx((5 + 6 + 7) / 27)
    assert m["mean_accuracy"] == pytest.approx((5 / 8 + 6 / 10 + 7 / 9) / 3)
    assert m["mean_iou"] == pytest.approx((5 / 9 + 6 / 14 + 7 / 13) / 3)
    assert m["frequency_weighted_iou"] == pytest.approx((8 * 5 / 9 + 10 * 6 / 14 + 9 * 7 / 13) / 27)
    assert m["labeled_pixels"] == 27
    pc = m["per_class"]
    assert pc["iou"] == pytest.approx(iou)
    assert pc["recall"] == pytest.approx(recall)
    assert pc["precision"] == pytest.approx(precision)
    assert pc["dice"] == pytest.approx(dice)
    assert pc["gt_pixels"] == [8, 10, 9]
    assert pc["pred_pixels"] == [6, 10, 11]


def test_class_absent_from_gt_and_prediction_is_nan_and_left_out_of_means():
    mat = np.array([[4, 0, 1], [0, 0, 0], [2, 0, 3]], dtype=np.int64)
    m = compute_metrics(mat)
    pc = m["per_class"]
    for key in ("iou", "dice", "precision", "recall"):
        assert math.isnan(pc[key][1]), key
        assert not math.isnan(pc[key][0]) and not math.isnan(pc[key][2]), key
    iou0 = 4 / (5 + 6 - 4)
    iou2 = 3 / (5 + 4 - 3)
    assert pc["iou"][0] == pytest.approx(iou0)
    assert pc["iou"][2] == pytest.approx(iou2)
    assert m["mean_iou"] == pytest.approx((iou0 + iou2) / 2)
    assert m["mean_accuracy"] == pytest.approx((4 / 5 + 3 / 5) / 2)
    assert m["pixel_accuracy"] == pytest.approx(7 / 10)
    assert m["frequency_weighted_iou"] == pytest.approx((5 * iou0 + 5 * iou2) / 10)


def test_class_predicted_but_absent_from_gt_counts_as_zero_iou():
    mat = np.array([[4, 1, 0], [0, 0, 0], [1, 2, 3]], dtype=np.int64)
    m = compute_metrics(mat)
    pc = m["per_class"]
    iou0 = 4 / (5 + 5 - 4)
    iou2 = 3 / (6 + 3 - 3)
    assert pc["iou"][1] == 0.0
    assert pc["precision"][1] == 0.0
    assert pc["dice"][1] == 0.0
    assert math.isnan(pc["recall"][1])  # 0/0: no ground truth for class 1
    assert m["mean_iou"] == pytest.approx((iou0 + 0.0 + iou2) / 3)
    # class 1's recall is 0/0, so it is left out of mean accuracy
    assert m["mean_accuracy"] == pytest.approx((4 / 5 + 3 / 6) / 2)
    assert m["frequency_weighted_iou"] == pytest.approx((5 * iou0 + 6 * iou2) / 11)


def test_empty_matrix_gives_nan_not_an_error():
    m = compute_metrics(np.zeros((3, 3), dtype=np.int64))
    assert m["labeled_pixels"] == 0
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou"):
        assert math.isnan(m[key]), key


def test_ignore_pixels_never_enter_the_matrix():
    rng = np.random.default_rng(0)
    c = 4
    gt = rng.integers(0, c, size=(37, 53)).astype(np.uint8)
    ignore = rng.random(gt.shape) < 0.3
    gt[ignore] = 255
    pred = rng.integers(0, c, size=gt.shape).astype(np.uint8)
    mat = confusion_counts(gt, pred, c)
    assert mat.shape == (c, c)
    assert mat.dtype == np.int64
    assert int(mat.sum()) == int((gt != 255).sum())
    assert 0 < int(mat.sum()) < gt.size

    pred2 = pred.copy()
    pred2[ignore] = (pred2[ignore] + 1) % c
    assert (pred2 != pred).sum() == ignore.sum()
    assert np.array_equal(confusion_counts(gt, pred2, c), mat)
    # changing the prediction where the label is *not* ignored does change the matrix
    pred3 = pred.copy()
    pred3[~ignore] = (pred3[~ignore] + 1) % c
    assert not np.array_equal(confusion_counts(gt, pred3, c), mat)


def test_confusion_counts_hand_example():
    gt = np.array([[0, 1, 255], [2, 2, 1]], np.uint8)
    pred = np.array([[0, 2, 1], [2, 0, 1]], np.uint8)
    expected = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 1]])
    assert np.array_equal(confusion_counts(gt, pred, 3), expected)


def test_confusion_counts_in_blocks_equals_one_bincount(monkeypatch):
    monkeypatch.setattr(metrics, "BLOCK_PIXELS", 1000)  # 5141 pixels: 6 blocks, the last one partial
    rng = np.random.default_rng(7)
    c = 5
    gt = rng.integers(0, c, (97, 53)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.2] = 255
    pred = rng.integers(0, c, gt.shape).astype(np.uint8)
    keep = gt != 255
    expected = np.bincount(gt[keep].astype(np.int64) * c + pred[keep], minlength=c * c).reshape(c, c)
    assert np.array_equal(confusion_counts(gt, pred, c), expected)
    with pytest.raises(ValueError, match="pixels"):
        confusion_counts(gt, pred[:-1], c)


def _torchvision_reference(h: torch.Tensor):
    """references/segmentation/utils.py ConfusionMatrix.compute, inline."""
    h = h.double()
    acc_global = torch.diag(h).sum() / h.sum()
    acc = torch.diag(h) / h.sum(1)
    iu = torch.diag(h) / (h.sum(1) + h.sum(0) - torch.diag(h))
    return acc_global, acc, iu


@pytest.mark.parametrize("seed", range(5))
def test_matches_torchvision_reference_formula(seed):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(2, 12))
    mat = rng.integers(1, 10_000, size=(c, c)).astype(np.int64)
    acc_global, acc, iu = _torchvision_reference(torch.from_numpy(mat))
    m = compute_metrics(mat)
    assert m["pixel_accuracy"] == pytest.approx(acc_global.item(), abs=1e-12)
    assert m["mean_accuracy"] == pytest.approx(acc.mean().item(), abs=1e-12)
    assert m["mean_iou"] == pytest.approx(iu.mean().item(), abs=1e-12)
    assert np.allclose(m["per_class"]["iou"], iu.numpy(), rtol=0, atol=1e-12)
    assert np.allclose(m["per_class"]["recall"], acc.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_matches_torchmetrics(seed):
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassConfusionMatrix,
        MulticlassJaccardIndex,
    )

    rng = np.random.default_rng(100 + seed)
    c = int(rng.integers(3, 8))
    gt = rng.integers(0, c, size=(2, 61, 47))
    # predictions agree with the label about half the time so the scores are not trivial
    pred = np.where(rng.random(gt.shape) < 0.5, gt, rng.integers(0, c, size=gt.shape))
    gt[rng.random(gt.shape) < 0.1] = 255
    assert set(np.unique(gt[gt != 255])) == set(range(c))
    assert set(np.unique(pred)) == set(range(c))

    mat = confusion_counts(gt, pred, c)
    ours = compute_metrics(mat)
    g = torch.from_numpy(gt.astype(np.int64))
    p = torch.from_numpy(pred.astype(np.int64))

    jac = MulticlassJaccardIndex(num_classes=c, average="macro", ignore_index=255)
    acc = MulticlassAccuracy(num_classes=c, average="micro", ignore_index=255)
    cm = MulticlassConfusionMatrix(num_classes=c, ignore_index=255)
    assert ours["mean_iou"] == pytest.approx(jac(p, g).item(), abs=1e-6)
    assert ours["pixel_accuracy"] == pytest.approx(acc(p, g).item(), abs=1e-6)
    assert np.array_equal(cm(p, g).numpy(), mat)


def test_accumulation_is_exact_for_any_grouping_and_order():
    rng = np.random.default_rng(7)
    c = 6
    gt = rng.integers(0, c, size=200_000).astype(np.uint8)
    gt[rng.random(gt.size) < 0.05] = 255
    pred = rng.integers(0, c, size=gt.size).astype(np.uint8)
    whole = confusion_counts(gt, pred, c)

    for trial in range(4):
        cuts = np.sort(rng.choice(np.arange(1, gt.size), size=int(rng.integers(1, 40)), replace=False))
        chunks = list(zip(np.split(gt, cuts), np.split(pred, cuts), strict=True))
        order = rng.permutation(len(chunks))
        acc = ConfusionMatrix(c)
        sparse = ConfusionMatrix(c)
        for k in order:
            g, p = chunks[k]
            acc.update(g, p)
            cells = sparse_confusion(confusion_counts(g, p, c))
            sparse.update_sparse(
                [cell["gt"] for cell in cells], [cell["pred"] for cell in cells], [cell["count"] for cell in cells]
            )
        assert acc.mat.dtype == np.int64
        assert np.array_equal(acc.mat, whole), trial
        assert np.array_equal(sparse.mat, whole), trial
        assert acc.compute() == compute_metrics(whole)


def test_sparse_confusion_lists_only_nonzero_cells():
    mat = np.array([[3, 0], [0, 5]], dtype=np.int64)
    assert sparse_confusion(mat) == [{"gt": 0, "pred": 0, "count": 3}, {"gt": 1, "pred": 1, "count": 5}]
    cm = ConfusionMatrix(2)
    cm.update_sparse([0, 1, 0], [1, 1, 1], [2, 4, 3])  # repeated cells add up
    assert np.array_equal(cm.mat, [[0, 5], [0, 4]])


def test_class_pixels_in_blocks_equal_one_bincount(monkeypatch):
    from pipeline import stats

    monkeypatch.setattr(stats, "BLOCK_PIXELS", 1000)
    mask = np.random.default_rng(3).integers(0, 6, (97, 53)).astype(np.uint8)
    expected = np.bincount(mask.ravel(), minlength=7)[:7]
    assert stats.class_pixels(mask, 7).tolist() == expected.tolist()
    assert stats.class_pixels(mask, 7).dtype == np.int64
