"""The output contract: paths under the output root, the stats Parquet schema, and the result files."""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

MANIFEST = "manifest.json"
METRICS = "metrics.json"
CONFUSION = "confusion_matrix.parquet"
RUN_ID_KEY = b"segpipe.run_id"
_REDUCE_FETCH = 32  # stats parts the reduce fetches at once (a part is KBs to a few MB)

STATS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("image_id", pa.string()),  # the image's path relative to the input root
        ("source_uri", pa.string()),
        ("shard_id", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mask_uri", pa.string()),
        ("class_pixels", pa.list_(pa.int64())),
        ("class_fraction", pa.list_(pa.float32())),
        ("mean_confidence", pa.float32()),
        ("labeled", pa.bool_()),
        ("label_uri", pa.string()),
        ("pixel_accuracy", pa.float64()),
        ("mean_iou", pa.float64()),
        ("confusion", pa.list_(pa.struct([("gt", pa.int32()), ("pred", pa.int32()), ("count", pa.int64())]))),
        ("error", pa.string()),
        ("model", pa.string()),
    ]
)


def stats_path(root: str, shard_id: str) -> str:
    return storage.join(root, "stats", f"part-{shard_id}.parquet")


def committed_parts(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, str]:
    """Shard id -> path of every stats part under ``root``, from one listing (no request per shard)."""
    prefix, suffix = "part-", ".parquet"
    paths = fs.glob(storage.join(root, "stats", f"{prefix}*{suffix}"))
    return {posixpath.basename(p)[len(prefix) : -len(suffix)]: p for p in paths}


def mask_path(root: str, image_id: str) -> str:
    return storage.join(root, "masks", f"{image_id}.png")


def unsafe_image_id(image_id: str) -> str | None:
    """Why ``image_id`` cannot name a file under masks/ (empty, absolute, a ``..`` or empty part), or None."""
    parts = image_id.split("/")
    if not image_id or image_id.startswith("/") or "\\" in image_id or any(p in ("", ".", "..") for p in parts):
        return f"image id {image_id!r} cannot name a mask file (empty, absolute, or with '.', '..' or '//' parts)"
    return None


def write_stats(fs: fsspec.AbstractFileSystem, path: str, rows: list[dict], run_id: str) -> None:
    """One shard's rows as one Parquet file (one row group), tagged with the run id; written whole."""
    schema = STATS_SCHEMA.with_metadata({RUN_ID_KEY: run_id.encode()})
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(fs, path, buf.getvalue())


def committed_run_id(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The run id a committed stats part was written by (None if the file is absent)."""
    try:
        with fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
    except FileNotFoundError:
        return None
    return meta.get(RUN_ID_KEY, b"").decode() or None


def read_confusion(fs: fsspec.AbstractFileSystem, paths: list[str], num_classes: int) -> tuple[np.ndarray, dict]:
    """Sum the per-image sparse confusion cells of the given parts; also count images, errors, labeled."""
    mat = np.zeros((num_classes, num_classes), dtype=np.int64)
    counts = {"images": 0, "errors": 0, "labeled": 0}
    for blob in _fetch_all(fs, paths):
        table = pq.read_table(pa.BufferReader(blob), columns=["confusion", "labeled", "error"])
        counts["images"] += table.num_rows
        counts["errors"] += table.num_rows - table["error"].null_count
        counts["labeled"] += int(np.sum(table["labeled"].to_numpy(zero_copy_only=False)))
        cells = table["confusion"].combine_chunks().flatten()
        if len(cells):
            np.add.at(
                mat,
                (cells.field("gt").to_numpy(), cells.field("pred").to_numpy()),
                cells.field("count").to_numpy(),
            )
    return mat, counts


def _fetch_all(fs: fsspec.AbstractFileSystem, paths: list[str]) -> Iterator[bytes]:
    """The files' bytes in order, fetched many at once (on S3 one GET after another would dominate the
    reduce), one bounded group at a time."""
    with ThreadPoolExecutor(_REDUCE_FETCH) as pool:
        for group in range(0, len(paths), _REDUCE_FETCH):
            yield from pool.map(fs.cat_file, paths[group : group + _REDUCE_FETCH])


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: dict) -> None:
    """NaN is written as null: JSON has no NaN, and metrics.json's definitions say what null means."""
    storage.write_bytes(fs, path, json.dumps(_json_safe(obj), indent=2, allow_nan=False, default=str).encode())


def _json_safe(obj):
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_confusion(fs: fsspec.AbstractFileSystem, path: str, mat: np.ndarray, class_names: list[str]) -> None:
    """Rows are ground truth, columns prediction: ``ground_truth`` then one int64 column per class."""
    cols = {"ground_truth": pa.array(class_names)}
    for j, name in enumerate(class_names):
        cols[f"pred_{name}"] = pa.array(mat[:, j], pa.int64())
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    storage.write_bytes(fs, path, buf.getvalue())
