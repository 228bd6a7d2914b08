"""Parquet in and out: the one writer, the run id a stats part carries, and the one confusion reduce."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.metrics import ConfusionMatrix

RUN_ID_KEY = b"segpipe.run_id"
SOURCES_KEY = b"segpipe.sources"  # JSON: input file (relative to the input root) -> its version when listed
TOTALS_KEY = b"segpipe.totals"  # JSON: the part's rows summed (see outputs.totals)
REDUCE_COLUMNS = ["confusion", "labeled", "error", "error_kind"]  # what reduce_confusion reads of a stats part
_REDUCE_FETCH = 32  # files the reduce fetches at once (a stats part is KBs to a few MB)


def write_table(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Every Parquet file segpipe writes goes through here: zstd, one row group, published whole."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(fs, path, buf.getvalue())


def stats_metadata(run_id: str, sources: dict[str, str], totals: bytes | None = None) -> dict[bytes, bytes]:
    """A stats part's footer: the run id (how a resumed run recognises its own parts), the input files its
    rows came from at their listed versions (what an incremental run compares with the input), and its
    rows' totals (``outputs.totals``: what the reduce adds up)."""
    meta = {RUN_ID_KEY: run_id.encode(), SOURCES_KEY: json.dumps(sources, sort_keys=True).encode()}
    return meta | ({TOTALS_KEY: totals} if totals is not None else {})


def part_sources(metadata: dict[bytes, bytes] | None) -> dict[str, str] | None:
    """The input files a stats part's rows came from, with their versions; None when it does not say (a part
    written before incremental runs, or by a layout that lists no versions)."""
    raw = (metadata or {}).get(SOURCES_KEY)
    return json.loads(raw) if raw else None


def committed_run_id(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The run id a committed stats part was written by (None if the file is absent)."""
    try:
        with fs.open(path, "rb") as f:
            return part_run_id(pq.read_schema(f).metadata)
    except FileNotFoundError:
        return None


def part_run_id(metadata: dict[bytes, bytes] | None) -> str | None:
    return (metadata or {}).get(RUN_ID_KEY, b"").decode() or None


def write_confusion(fs: fsspec.AbstractFileSystem, path: str, mat: np.ndarray, class_names: list[str]) -> None:
    """Rows are ground truth, columns prediction: ``ground_truth`` then one int64 column per class."""
    cols = {"ground_truth": pa.array(class_names)}
    for j, name in enumerate(class_names):
        cols[f"pred_{name}"] = pa.array(mat[:, j], pa.int64())
    write_table(fs, path, pa.table(cols))


@dataclass
class RowCounts:
    images: int = 0
    errors: int = 0
    labeled: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)  # error rows by ErrorKind (stats parts only)

    def __add__(self, other: RowCounts) -> RowCounts:
        return RowCounts(
            self.images + other.images,
            self.errors + other.errors,
            self.labeled + other.labeled,
            self.error_kinds + other.error_kinds,
        )


def reduce_confusion(tables: Iterable[pa.Table], num_classes: int) -> tuple[np.ndarray, RowCounts]:
    """Sum the sparse confusion cells of every row of ``tables`` (stats parts, evaluation rows) into the exact
    int64 dataset matrix; also count rows, error rows and labeled rows."""
    total, counts = ConfusionMatrix(num_classes), RowCounts()
    for table in tables:
        counts.images += table.num_rows
        counts.errors += table.num_rows - table["error"].null_count
        counts.labeled += int(np.sum(table["labeled"].to_numpy(zero_copy_only=False)))
        if "error_kind" in table.column_names:
            counts.error_kinds.update(k for k in table["error_kind"].to_pylist() if k is not None)
        cells = table["confusion"].combine_chunks().flatten()
        if len(cells):
            total.update_sparse(cells.field("gt"), cells.field("pred"), cells.field("count"))
    return total.mat, counts


def reduce_parts(fs: fsspec.AbstractFileSystem, paths: list[str], num_classes: int) -> tuple[np.ndarray, RowCounts]:
    """``reduce_confusion`` over the stats parts at ``paths``, reading only the columns it needs."""
    return reduce_confusion(read_tables(fs, paths, REDUCE_COLUMNS), num_classes)


def read_tables(fs: fsspec.AbstractFileSystem, paths: list[str], columns: list[str]) -> Iterator[pa.Table]:
    """The files' ``columns`` in order; a column a file lacks (one written by an earlier version) is left out."""
    for blob in fetch_all(fs, paths):
        part = pq.ParquetFile(pa.BufferReader(blob))
        yield part.read(columns=[c for c in columns if c in part.schema_arrow.names])


def read_sources(fs: fsspec.AbstractFileSystem, paths: list[str]) -> Iterator[tuple[dict[str, str] | None, int]]:
    """Each stats part's ``part_sources`` and row count, in order, from its footer alone."""
    for blob in fetch_all(fs, paths):
        meta = pq.read_metadata(pa.BufferReader(blob))
        yield part_sources(meta.metadata), meta.num_rows


def fetch_all(fs: fsspec.AbstractFileSystem, paths: list[str]) -> Iterator[bytes]:
    """The files' bytes in order, fetched many at once (on S3 one GET after another would dominate a reduce
    over thousands of parts), one bounded group at a time."""
    with ThreadPoolExecutor(_REDUCE_FETCH) as pool:
        for group in range(0, len(paths), _REDUCE_FETCH):
            yield from pool.map(fs.cat_file, paths[group : group + _REDUCE_FETCH])
