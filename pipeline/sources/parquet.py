"""The ``parquet`` layout: Parquet files with a column of encoded image bytes, cut into shards of row groups.

The image column is ``binary`` or the Hugging Face ``datasets`` Image layout ``struct<bytes: binary, path: string>``;
so is the optional label column. Files and folders starting with "." or "_" are skipped, as pyarrow.dataset
does, so Spark's ``_temporary/`` output and ``.crc`` files are not read.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.sources.base import (
    InputFile,
    Layout,
    Sample,
    Shard,
    file_path,
    increment_shard_id,
    shard_id_for,
)
from pipeline.sources.listing import list_files
from pipeline.sources.registry import register_layout
from pipeline.storage import to_uri

if TYPE_CHECKING:
    from pipeline.config import InputConfig

SUFFIX = ".parquet"
FOOTER_THREADS = 16  # footers are small reads: the listing's latency, not bandwidth, is what threads hide
IGNORE = (".", "_")  # pyarrow.dataset's hidden prefixes
BATCH_ROWS = 64  # rows decoded at a time: an actor holds one row group's compressed columns and one batch


def plan(
    fs: fsspec.AbstractFileSystem,
    root: str,
    shard_size: int,
    image_column: str = "image",
    label_column: str | None = None,
    id_column: str | None = None,
) -> list[Shard]:
    """Shards of consecutive row groups of at least ``shard_size`` rows; a file never spans two shards.

    ``root`` is a folder, or one ``.parquet`` file: its shards' member is then its basename, and ``read``
    takes the same ``root``. Only the footers are read; a file whose columns do not fit raises InputError.
    """
    files = list_files(fs, root, (SUFFIX,), ignore_prefixes=IGNORE)
    return shards_of(fs, root, files, shard_size, (image_column, label_column, id_column))


def shards_of(
    fs: fsspec.AbstractFileSystem,
    root: str,
    files: list[InputFile],
    shard_size: int,
    columns: tuple[str, str | None, str | None],
    increment: int | None = None,
) -> list[Shard]:
    """Cut each of ``files`` into row-group ranges (``columns``: image, label, id). A shard is named by its
    position in the plan, or in an increment by its file, version and row groups."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")

    def name(n: int, f: InputFile, start: int, stop: int) -> str:
        if increment is None:
            return shard_id_for(n, f.path, f.size, start, stop)
        return increment_shard_id(increment, f.path, f.version, start, stop)

    paths = [file_path(root, f.path) for f in files]
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(paths) or 1)) as pool:
        footers = list(pool.map(lambda path: _footer(fs, path), paths))
    shards = []
    for f, path, (schema, meta) in zip(files, paths, footers, strict=True):
        _check_schema(to_uri(fs, path), schema, *columns)
        counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        for start, stop, rows in cut_row_groups(counts, shard_size):
            shard_id = name(len(shards), f, start, stop)
            shards.append(
                Shard(
                    shard_id,
                    member=f.path,
                    row_groups=(start, stop),
                    images=rows,
                    versions=(f.version,),
                    increment=increment or 1,
                    sizes=(f.size,),
                )
            )
    return shards


def cut_row_groups(counts: list[int], shard_size: int) -> list[tuple[int, int, int]]:
    """``(start, stop, rows)``: row groups accumulated until they hold ``shard_size`` rows; no empty range."""
    ranges, start, rows = [], 0, 0
    for g, n in enumerate(counts):
        rows += n
        if rows >= shard_size:
            ranges.append((start, g + 1, rows))
            start, rows = g + 1, 0
    if rows:
        ranges.append((start, len(counts), rows))
    return ranges


def read(
    fs: fsspec.AbstractFileSystem,
    root: str,
    shard: Shard,
    image_column: str = "image",
    label_column: str | None = None,
    id_column: str | None = None,
) -> Iterator[Sample]:
    """Stream the shard's rows in file order, one row group and ``BATCH_ROWS`` rows at a time, only the named columns.

    ``image_id`` is the id column's value, else ``<file without .parquet>/<row in file, 8 digits>`` (also for a
    null id); ``name`` is the id, else the struct's ``path``, else the image_id.
    """
    path = file_path(root, shard.member)
    uri = to_uri(fs, path)
    base = shard.member[: -len(SUFFIX)]
    start, stop = shard.row_groups
    columns = list(dict.fromkeys(c for c in (image_column, label_column, id_column) if c))
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        row = sum(pf.metadata.row_group(g).num_rows for g in range(start))
        for g in range(start, stop):
            # One group per call: pyarrow pre-buffers every group it is given, in one coalesced read.
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=columns):
                for record in batch.to_pylist():
                    yield _sample(record, row, base, uri, image_column, label_column, id_column)
                    row += 1


def _footer(fs: fsspec.AbstractFileSystem, path: str) -> tuple[pa.Schema, pq.FileMetaData]:
    with fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except pa.ArrowInvalid as e:
            raise InputError(f"{to_uri(fs, path)}: not a readable Parquet file ({e})") from e
        return pf.schema_arrow, pf.metadata


def _check_schema(
    uri: str, schema: pa.Schema, image_column: str, label_column: str | None, id_column: str | None
) -> None:
    roles = {"image_column": image_column, "label_column": label_column, "id_column": id_column}
    for role, column in roles.items():
        if column is not None and column not in schema.names:
            raise InputError(f"{uri}: input.{role} {column!r} is not a column (columns: {', '.join(schema.names)})")
    for role in ("image_column", "label_column"):
        column = roles[role]
        if column is not None and not _holds_bytes(schema.field(column).type):
            raise InputError(
                f"{uri}: input.{role} {column!r} is {schema.field(column).type}, "
                "expected binary or struct<bytes: binary, path: string>"
            )


def _holds_bytes(t: pa.DataType) -> bool:
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        t = t.field("bytes").type
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _sample(
    record: dict, row: int, base: str, uri: str, image_column: str, label_column: str | None, id_column: str | None
) -> Sample:
    image, path = _bytes_and_path(record[image_column])
    label = _bytes_and_path(record[label_column])[0] if label_column else None
    ident = record[id_column] if id_column else None
    image_id = str(ident) if ident is not None else f"{base}/{row:08d}"
    name = str(ident) if ident is not None else path or image_id
    error = None if image is not None else "null image"
    return Sample(image_id, name, f"{uri}#row={row}", image, label=label, error=error)


def _bytes_and_path(value: bytes | dict | None) -> tuple[bytes | None, str | None]:
    """A binary cell, or a Hugging Face Image struct whose bytes or path may each be null."""
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    return value, None


@register_layout("parquet")
class ParquetLayout(Layout):
    """Parquet files; a folder is this layout when it holds neither loose images nor tars."""

    file_suffixes = listing_suffixes = (SUFFIX,)
    file_kind = "Parquet"
    listing_kind = "Parquet files"
    priority = 30

    def plan(self, fs: fsspec.AbstractFileSystem, root: str, cfg: InputConfig, shard_size: int) -> list[Shard]:
        return plan(fs, root, shard_size, cfg.image_column, cfg.label_column, cfg.id_column)

    def list_inputs(self, fs: fsspec.AbstractFileSystem, root: str, cfg: InputConfig) -> list[InputFile]:
        return list_files(fs, root, (SUFFIX,), ignore_prefixes=IGNORE)

    def plan_increment(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        cfg: InputConfig,
        files: list[InputFile],
        shard_size: int,
        increment: int,
    ) -> list[Shard]:
        columns = (cfg.image_column, cfg.label_column, cfg.id_column)
        return shards_of(fs, root, files, shard_size, columns, increment)

    def read(
        self, fs: fsspec.AbstractFileSystem, root: str, shard: Shard, cfg: InputConfig, pool: Executor
    ) -> Iterator[Sample]:
        return read(fs, root, shard, cfg.image_column, cfg.label_column, cfg.id_column)
