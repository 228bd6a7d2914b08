"""A finished run's aggregates for its report, read from its outputs: the manifest, ``metrics.json``, the
confusion matrix, and one pass over the stats parts (a few columns) for class pixel totals, per-image mean IoU
and confidence, the worst images and the error rows by reason. Memory grows with the run only by two floats an
image; nothing else of the data is held.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import InputError
from pipeline.outputs import CONFUSION, METRICS, Manifest, part_paths, read_manifest, read_tables

COLUMNS = [
    *("image_id", "source_uri", "mask_uri", "label_uri", "class_pixels", "mean_confidence", "labeled"),
    *("mean_iou", "pixel_accuracy", "error", "error_kind", "crs", "bounds"),
]
IDS_PER_REASON = 20  # image ids listed under each error reason


@dataclass(frozen=True, order=True)
class Shown:
    """One image of the gallery; ordered by ``score``, lowest (worst) first."""

    score: float
    image_id: str
    source_uri: str = field(compare=False)
    mask_uri: str = field(compare=False)
    label_uri: str | None = field(compare=False)
    mean_iou: float | None = field(compare=False)
    pixel_accuracy: float | None = field(compare=False)
    mean_confidence: float = field(compare=False)
    crs: str | None = field(compare=False, default=None)  # a georeferenced image's, with its bounds in it
    bounds: dict[str, float] | None = field(compare=False, default=None)


@dataclass
class ErrorGroup:
    reason: str
    kind: str | None
    count: int = 0
    image_ids: list[str] = field(default_factory=list)  # the first IDS_PER_REASON


@dataclass
class RunData:
    uri: str
    manifest: Manifest
    metrics: dict
    confusion: np.ndarray  # [C, C] int64, rows ground truth, columns prediction
    class_pixels: np.ndarray  # predicted pixels per class over the run, int64
    image_mean_iou: np.ndarray  # per labeled image
    image_confidence: np.ndarray  # per segmented image
    worst: list[Shown]  # the gallery, worst first
    ranked_by: str  # "mean IoU" (a labeled run) or "confidence"
    errors: list[ErrorGroup]  # most frequent reason first

    @property
    def class_names(self) -> list[str]:
        return self.manifest.model.class_names

    @property
    def labeled(self) -> bool:
        return bool(self.metrics.get("labeled_pixels"))


def load_run(fs, root: str, worst: int = 12) -> RunData:
    """The aggregates of the finished run at ``root``; InputError when it is not one."""
    uri = storage.to_uri(fs, root)
    manifest = read_manifest(fs, root)
    if manifest is None or not manifest.complete:
        raise InputError(f"output {uri} holds no complete run (no manifest.json with status complete)")
    metrics = json.loads(fs.cat_file(storage.join(root, METRICS)))
    names = manifest.model.class_names
    confusion = read_confusion(fs, storage.join(root, CONFUSION), len(names))
    agg = aggregate(read_tables(fs, part_paths(root, manifest), COLUMNS), len(names), worst)
    ranked_by = "mean IoU" if agg.by_iou else "confidence"
    return RunData(
        uri=uri,
        manifest=manifest,
        metrics=metrics,
        confusion=confusion,
        class_pixels=agg.class_pixels,
        image_mean_iou=np.concatenate(agg.mean_iou or [np.zeros(0)]),
        image_confidence=np.concatenate(agg.confidence or [np.zeros(0)]),
        worst=sorted(shown for _, _, shown in (agg.by_iou or agg.by_confidence)),
        ranked_by=ranked_by,
        errors=sorted(agg.errors.values(), key=lambda g: (-g.count, g.reason)),
    )


@dataclass
class Aggregates:
    class_pixels: np.ndarray
    mean_iou: list[np.ndarray] = field(default_factory=list)
    confidence: list[np.ndarray] = field(default_factory=list)
    # the worst labeled images, and the worst by confidence: max-heaps of (-score, image id, Shown)
    by_iou: list[tuple] = field(default_factory=list)
    by_confidence: list[tuple] = field(default_factory=list)
    errors: dict[str, ErrorGroup] = field(default_factory=dict)


def aggregate(tables: Iterable[pa.Table], num_classes: int, worst: int) -> Aggregates:
    """One pass over stats tables (``COLUMNS``); keeps ``worst`` images by mean IoU and by confidence."""
    agg = Aggregates(class_pixels=np.zeros(num_classes, np.int64))
    for table in tables:
        ok = table.filter(pc.is_null(table["error"]))
        if ok.num_rows:
            counts = pc.list_flatten(ok["class_pixels"]).to_numpy(zero_copy_only=False)
            agg.class_pixels += counts.reshape(ok.num_rows, num_classes).sum(axis=0)
            agg.confidence.append(ok["mean_confidence"].to_numpy(zero_copy_only=False).astype(np.float64))
            labeled = ok.filter(pc.and_(ok["labeled"], pc.is_valid(ok["mean_iou"])))
            agg.mean_iou.append(labeled["mean_iou"].to_numpy(zero_copy_only=False))
            _keep_worst(agg.by_iou, labeled, "mean_iou", worst)
            _keep_worst(agg.by_confidence, ok, "mean_confidence", worst)
        _count_errors(agg.errors, table.filter(pc.is_valid(table["error"])))
    return agg


def _keep_worst(heap: list[tuple], table: pa.Table, key: str, worst: int) -> None:
    """Push the table's ``worst`` lowest rows by ``key`` into ``heap`` (kept at the ``worst`` lowest overall)."""
    if not table.num_rows or not worst:
        return
    lowest = table.take(pc.select_k_unstable(table, worst, [(key, "ascending")]))
    for row in lowest.to_pylist():
        shown = Shown(
            score=float(row[key]),
            image_id=row["image_id"],
            source_uri=row["source_uri"],
            mask_uri=row["mask_uri"],
            label_uri=row["label_uri"],
            mean_iou=row["mean_iou"],
            pixel_accuracy=row["pixel_accuracy"],
            mean_confidence=float(row["mean_confidence"]),
            crs=row.get("crs"),
            bounds=row.get("bounds"),
        )
        item = (-shown.score, shown.image_id, shown)  # a max-heap: its top is the best of the worst
        if len(heap) < worst:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)


def _count_errors(groups: dict[str, ErrorGroup], errors: pa.Table) -> None:
    for image_id, reason, kind in zip(
        errors["image_id"].to_pylist(), errors["error"].to_pylist(), errors["error_kind"].to_pylist(), strict=True
    ):
        group = groups.setdefault(reason, ErrorGroup(reason, kind))
        group.count += 1
        if len(group.image_ids) < IDS_PER_REASON:
            group.image_ids.append(image_id)


def read_confusion(fs, path: str, num_classes: int) -> np.ndarray:
    table = pq.read_table(pa.BufferReader(fs.cat_file(path)))
    return (
        np.stack([table[c].to_numpy() for c in table.column_names[1:]], axis=1)
        .astype(np.int64)
        .reshape(num_classes, num_classes)
    )
