"""A stats part's rows summed: what the dataset reduce adds up, a few KB per shard whatever its images.

Each stats part carries its ``Totals`` in its footer (``segpipe.totals``), and each shard's summary brings them
to the driver, which folds them as they arrive. So the reduce costs one addition per shard, never a read of
every row; the rows keep their sparse confusion for an exact re-reduce of any subset of images.
Totals are exact int64 sums: totals of parts add up to the totals of their union, in any order or grouping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.outputs.rows import ImageRow, to_table
from pipeline.outputs.tables import (
    REDUCE_COLUMNS,
    TOTALS_KEY,
    RowCounts,
    fetch_all,
    reduce_confusion,
    stats_metadata,
    write_table,
)


def write_stats(
    fs: fsspec.AbstractFileSystem,
    path: str,
    rows: list[ImageRow],
    run_id: str,
    sources: dict[str, str],
    num_classes: int,
) -> Totals:
    """One shard's rows, their footer naming the run, the input files and the rows' totals; returns the totals."""
    table = to_table(rows, ImageRow)
    totals = Totals.of_table(table, num_classes)
    write_table(fs, path, table.replace_schema_metadata(stats_metadata(run_id, sources, totals.to_metadata())))
    return totals


@dataclass
class Totals:
    """Row counts, the int64 confusion matrix (rows ground truth) and predicted pixels per class."""

    num_classes: int
    counts: RowCounts = field(default_factory=RowCounts)
    confusion: np.ndarray = None  # (C, C) int64
    class_pixels: np.ndarray = None  # (C,) int64

    def __post_init__(self) -> None:
        c = self.num_classes
        self.confusion = np.zeros((c, c), np.int64) if self.confusion is None else self.confusion
        self.class_pixels = np.zeros(c, np.int64) if self.class_pixels is None else self.class_pixels

    def __add__(self, other: Totals) -> Totals:
        total = Totals(self.num_classes)
        total += self
        total += other
        return total

    def __iadd__(self, other: Totals) -> Totals:
        """In place: the driver folds a million shards' totals without a new object for each."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"totals of {self.num_classes} and {other.num_classes} classes do not add up")
        self.counts.images += other.counts.images
        self.counts.errors += other.counts.errors
        self.counts.labeled += other.counts.labeled
        self.counts.error_kinds.update(other.counts.error_kinds)
        self.confusion += other.confusion
        self.class_pixels += other.class_pixels
        return self

    @classmethod
    def of_table(cls, table: pa.Table, num_classes: int) -> Totals:
        """The totals of a stats table's rows (the same reduce the dataset metrics always came from)."""
        confusion, counts = reduce_confusion([table], num_classes)
        pixels = pc.list_flatten(table["class_pixels"].combine_chunks().drop_null()).to_numpy(zero_copy_only=False)
        class_pixels = pixels.astype(np.int64).reshape(-1, num_classes).sum(axis=0) if len(pixels) else None
        return cls(num_classes, counts, confusion, class_pixels)

    def to_metadata(self) -> bytes:
        """JSON for a footer: the confusion as its non-zero cells, so many classes stay small."""
        gt, pred = np.nonzero(self.confusion)
        doc = {
            "images": self.counts.images,
            "errors": self.counts.errors,
            "labeled": self.counts.labeled,
            "error_kinds": dict(sorted(self.counts.error_kinds.items())),
            "confusion": [[int(i), int(j), int(self.confusion[i, j])] for i, j in zip(gt, pred, strict=True)],
            "class_pixels": self.class_pixels.tolist(),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None, num_classes: int) -> Totals | None:
        """The totals a footer carries; None when it carries none (a part written before totals were)."""
        raw = (metadata or {}).get(TOTALS_KEY)
        if not raw:
            return None
        doc = json.loads(raw)
        confusion = np.zeros((num_classes, num_classes), np.int64)
        for i, j, n in doc["confusion"]:
            confusion[i, j] = n
        counts = RowCounts(doc["images"], doc["errors"], doc["labeled"])
        counts.error_kinds.update(doc["error_kinds"])
        return cls(num_classes, counts, confusion, np.asarray(doc["class_pixels"], np.int64))


def read_totals(fs: fsspec.AbstractFileSystem, paths: list[str], num_classes: int) -> Totals:
    """The stats parts at ``paths`` summed, from their footers (a part written before footers carried totals
    is reduced from its rows)."""
    total = Totals(num_classes)
    for blob in fetch_all(fs, paths):
        reader = pa.BufferReader(blob)
        found = Totals.from_metadata(pq.read_metadata(reader).metadata, num_classes)
        if found is None:
            found = Totals.of_table(pq.read_table(reader, columns=[*REDUCE_COLUMNS, "class_pixels"]), num_classes)
        total += found
    return total
