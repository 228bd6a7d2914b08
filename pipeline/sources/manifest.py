"""The ``manifest`` layout: a list of image URIs (a Parquet or CSV file, a folder of them, or an S3 Inventory
report) instead of a listing, so planning 100 million images reads one table and lists nothing.

``input_uri`` is a ``.parquet``, ``.csv`` or ``.csv.gz`` file, an S3 Inventory ``manifest.json`` (its CSV or
Parquet data files are read), or a folder of Parquet/CSV files (sorted by path, names starting with "." or "_"
skipped, as the parquet layout does; a ``manifest.json`` in it wins). Auto-detection takes a ``.csv``/``.csv.gz``
file, a file named ``manifest.json``, or a folder of them; a Parquet manifest needs ``input.layout: manifest``,
since a ``.parquet`` file is otherwise the parquet layout's image bytes.

Columns, by name in any case: ``uri`` (or ``url``, ``path``; a full URI, or a path relative to the manifest
file's folder), or S3 Inventory's ``bucket`` and ``key``; optional ``size`` and ``etag`` (``e_tag``). A headerless
CSV is S3 Inventory's (columns from ``manifest.json``'s ``fileSchema``, else ``bucket, key, ...``; keys
URL-encoded) or, when its first field is a URI, one ``uri`` column. The images are read from the manifest's own
store: a URI of another one is an error row.

An image's id (its mask is ``masks/<id>.png``, its label found by it under ``labels_uri``) is its URI relative to
``input.base_uri``, by default the manifest's longest common folder: the ids the files layout gives when listing
that folder. Shards are consecutive manifest rows, in the manifest's order. Incremental runs are not supported
(the layout lists no versions to compare).
"""

from __future__ import annotations

import csv
import json
import logging
import os.path
import posixpath
import re
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import ConfigError, InputError
from pipeline.images import IMAGE_EXTENSIONS
from pipeline.sources.base import Layout, Sample, Shard, shard_id_for
from pipeline.sources.files import READ_AHEAD, fetch_image
from pipeline.sources.listing import list_files
from pipeline.sources.parquet import IGNORE
from pipeline.sources.prefetch import ordered_prefetch
from pipeline.sources.registry import register_layout

if TYPE_CHECKING:
    from pipeline.config import InputConfig

log = logging.getLogger(__name__)

INVENTORY = "manifest.json"  # what S3 Inventory names the report that lists its data files
DATA_SUFFIXES = (".parquet", ".csv", ".csv.gz")
ROLES = {  # role -> the column names that hold it, lowercase
    "uri": ("uri", "url", "path"),
    "bucket": ("bucket",),
    "key": ("key",),
    "size": ("size",),
    "etag": ("etag", "e_tag"),  # S3 Inventory: ETag in a CSV's fileSchema, e_tag in Parquet
}
KNOWN = {name for names in ROLES.values() for name in names}
LOCATION = ("uri", "bucket", "key")  # the roles that say where an image is
BATCH_ROWS = 65_536  # Parquet rows per batch: a manifest is read a batch at a time, never whole
IMAGE_KEY = "(" + "|".join(re.escape(ext) for ext in IMAGE_EXTENSIONS) + ")$"
NULL = pa.scalar(None, pa.string())
_KINDS = "Parquet, CSV (.csv, .csv.gz) or S3 Inventory manifest.json file, or a folder of them"


@dataclass(frozen=True)
class DataFile:
    """One table of the manifest; ``columns``: a headerless CSV's names (an inventory's fileSchema), else read."""

    path: str
    columns: tuple[str, ...] = ()


def manifest_files(fs: fsspec.AbstractFileSystem, root: str) -> list[DataFile]:
    """The tables ``root`` names: itself, an inventory's data files, or a folder's files sorted by path."""
    if fs.isfile(root):
        if posixpath.basename(root).lower() == INVENTORY:
            return inventory_files(fs, root)
        if not root.lower().endswith(DATA_SUFFIXES):
            raise InputError(f"input {storage.to_uri(fs, root)}: a manifest is a {_KINDS}")
        return [DataFile(root)]
    found = [f.path for f in list_files(fs, root, (*DATA_SUFFIXES, INVENTORY), ignore_prefixes=IGNORE)]
    if INVENTORY in found:
        return inventory_files(fs, storage.join(root, INVENTORY))
    data = [DataFile(storage.join(root, p)) for p in found if p.lower().endswith(DATA_SUFFIXES)]
    if not data:
        raise InputError(f"input {storage.to_uri(fs, root)} holds no manifest: expected a {_KINDS}")
    return data


def inventory_files(fs: fsspec.AbstractFileSystem, path: str) -> list[DataFile]:
    """The data files an S3 Inventory ``manifest.json`` lists, in its destination bucket on the same store."""
    uri = storage.to_uri(fs, path)
    try:
        doc = json.loads(fs.cat_file(path))
        bucket = doc["destinationBucket"].removeprefix("arn:aws:s3:::")
        fmt, keys = doc["fileFormat"].lower(), [f["key"] for f in doc["files"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{uri}: not an S3 Inventory manifest.json ({type(e).__name__}: {e})") from e
    if fmt not in ("csv", "parquet"):
        raise InputError(f"{uri}: inventory format {doc['fileFormat']} is not supported (CSV or Parquet)")
    columns = tuple(c.strip() for c in doc.get("fileSchema", "").split(",")) if fmt == "csv" else ()
    return [DataFile(f"{bucket}/{key}", columns) for key in keys]


def columns_for(names: list[str] | tuple[str, ...]) -> dict[str, str] | None:
    """Role (uri, or bucket and key; size, etag) -> the column holding it, by name in any case; None when there
    is no uri column nor bucket and key."""
    lower = {name.strip().lower(): name for name in reversed(names)}  # the first of a repeated name wins
    found = {}
    for role, aliases in ROLES.items():
        name = next((lower[a] for a in aliases if a in lower), None)
        if name is not None:
            found[role] = name
    if "uri" in found:
        return {role: name for role, name in found.items() if role not in ("bucket", "key")}
    return found if {"bucket", "key"} <= found.keys() else None


def csv_columns(first_row: list[str]) -> tuple[list[str], bool]:
    """A CSV's column names and whether its first row is a header (it holds a known name). A headerless file is
    one ``uri`` column when its first field is a URI (or it has one field), else S3 Inventory's bucket, key, ..."""
    if any(field.strip().lower() in KNOWN for field in first_row):
        return list(first_row), True
    lead = ["uri"] if "://" in first_row[0] or len(first_row) == 1 else ["bucket", "key"]
    return lead + [f"column_{i}" for i in range(len(lead), len(first_row))], False


def common_folder(low: str, high: str) -> str:
    """The longest folder (ending at a "/") holding both; of a set's min and max, it holds the whole set."""
    prefix = os.path.commonprefix([low, high])
    return prefix[: prefix.rfind("/") + 1]


def error_id(uri: str) -> str:
    """A URI as a relative name (its scheme the first folder), for the error row of an image with no id."""
    return "/".join(part for part in uri.replace("://", "/", 1).split("/") if part not in ("", ".", ".."))


def schemes_of(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    """``("s3://", "s3a://")``: the URI prefixes of ``fs``'s store, the one it writes first."""
    return tuple(f"{p}://" for p in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol))


class Normaliser:
    """Manifest values -> URIs as the files layout writes them (``to_uri(fs, fs._strip_protocol(uri))``), so
    the same object has the same ``source_uri`` however it was found. A URI of another store is kept as given."""

    def __init__(self, fs: fsspec.AbstractFileSystem, folder: str) -> None:
        self.fs, self.folder, self.schemes = fs, folder, schemes_of(fs)

    def __call__(self, value: str) -> str:
        """A full URI, or a path relative to the manifest's folder."""
        if "://" not in value:
            value = posixpath.normpath(posixpath.join(self.folder, value))
        elif not value.startswith(self.schemes):
            return value
        return storage.to_uri(self.fs, self.fs._strip_protocol(value))

    def column(self, values: pa.Array) -> pa.Array:
        """Each value normalised, computed once per distinct folder with the names appended in Arrow: one call
        costs 1-3 us (fsspec's path handling), 30 s per 10M rows. A value that does not split plainly into a
        folder and a name (a trailing "/", a name "." or "..", a root folder) is normalised whole."""
        relative = pc.invert(pc.match_substring(values, "/"))  # a bare name: in the manifest's folder
        parts = pc.split_pattern(
            _where(relative, pc.binary_join_element_wise("./", values, ""), values), "/", max_splits=1, reverse=True
        )
        folders = pc.list_element(parts, 0).dictionary_encode()
        names = pc.list_element(parts, 1)
        names = _where(pc.is_in(names, pa.array(["", ".", ".."])), NULL, names)
        normal = pa.array([self._folder(f) for f in folders.dictionary.to_pylist()], pa.string())
        joined = pc.binary_join_element_wise(normal.take(folders.indices), names, "/")
        odd = pc.and_(pc.is_valid(values), pc.is_null(joined))
        whole = [self(v) for v in values.filter(odd).to_pylist()]
        return pc.replace_with_mask(joined, odd, pa.array(whole, pa.string()))

    def _folder(self, folder: str) -> str | None:
        """A folder's normal form, None where appending "/name" would not be the name's (a root)."""
        normal = self(folder) if folder and not folder.endswith("/") else None
        return None if normal is None or normal.endswith("/") else normal


def read_rows(fs: fsspec.AbstractFileSystem, f: DataFile) -> Iterator[pa.Table]:
    """One table's rows in order, a batch at a time, as columns uri (null: the row names no image), size and
    version (the ETag as ``content_version`` writes it)."""
    for batch in _batches(fs, f):
        n = len(batch["uri"])
        size = batch.get("size", pa.nulls(n, pa.int64()))
        version = pa.nulls(n, pa.string())
        if "etag" in batch:
            version = pc.binary_join_element_wise("etag:", pc.utf8_trim(batch["etag"], '"'), "")
        yield pa.table({"uri": batch["uri"], "size": size, "version": version})


def read_uris(fs: fsspec.AbstractFileSystem, f: DataFile) -> Iterator[pa.Array]:
    """One table's image URIs, a batch at a time (null: the row names no image), reading no other column."""
    for batch in _batches(fs, f, LOCATION):
        yield batch["uri"]


def _batches(fs: fsspec.AbstractFileSystem, f: DataFile, wanted: tuple[str, ...] = tuple(ROLES)) -> Iterator[dict]:
    """Role -> column, a batch at a time, reading only the ``wanted`` roles' columns; ``uri`` normalised, null
    where the row names no image (an empty value; an inventory's object that is not an image: inventories list
    whole buckets, with labels and folder markers)."""
    uri = storage.to_uri(fs, f.path)
    normalise = Normaliser(fs, posixpath.dirname(f.path))
    try:
        for batch, decode in _tables(fs, f, uri, wanted):
            if "uri" not in batch:
                batch["uri"] = _object_uris(batch.pop("bucket"), batch.pop("key"), normalise.schemes[0], decode)
            batch["uri"] = normalise.column(batch["uri"])
            yield batch
    except pa.ArrowInvalid as e:
        raise InputError(f"{uri}: not a readable manifest ({e})") from e


def _object_uris(buckets: pa.Array, keys: pa.Array, scheme: str, decode: bool) -> pa.Array:
    """``<scheme>bucket/key`` of the images among S3 Inventory's objects. Its CSVs URL-encode the keys."""
    if decode:
        encoded = pc.fill_null(pc.match_substring_regex(keys, "[%+]"), False)
        plain = [unquote_plus(k) for k in keys.filter(encoded).to_pylist()]
        keys = pc.replace_with_mask(keys, encoded, pa.array(plain, pa.string()))
    keys = _where(pc.invert(pc.match_substring_regex(keys, IMAGE_KEY, ignore_case=True)), NULL, keys)
    return pc.binary_join_element_wise(scheme, pc.binary_join_element_wise(buckets, keys, "/"), "")


def _tables(fs: fsspec.AbstractFileSystem, f: DataFile, uri: str, wanted: tuple[str, ...]) -> Iterator[tuple]:
    """``(role -> column, keys URL-encoded)`` a batch at a time; sizes as integers, the rest as text, empty
    text as null. Keys are taken as encoded in a headerless CSV: S3 Inventory's, the only such CSVs we know."""
    if f.path.lower().endswith(".parquet"):
        with fs.open(f.path, "rb") as h:
            pf = pq.ParquetFile(h)
            roles = _usable(uri, pf.schema_arrow.names, wanted)
            for batch in pf.iter_batches(BATCH_ROWS, columns=list(dict.fromkeys(roles.values()))):
                yield _columns(batch, roles), False
        return
    if f.columns:
        names, header = list(f.columns), False
    else:
        first = _first_row(fs, f.path)
        if not first:
            return  # an empty file lists nothing
        names, header = csv_columns(first)
    roles = _usable(uri, names, wanted)
    types = {name: pa.int64() if role == "size" else pa.string() for role, name in roles.items()}
    read = pacsv.ReadOptions(column_names=names, skip_rows=int(header))
    convert = pacsv.ConvertOptions(include_columns=list(types), column_types=types)
    with fs.open(f.path, "rb", compression="infer") as h:
        for batch in pacsv.open_csv(h, read_options=read, convert_options=convert):
            yield _columns(batch, roles), not header


def _usable(uri: str, names: list[str], wanted: tuple[str, ...]) -> dict[str, str]:
    roles = columns_for(names)
    if roles is None:
        raise InputError(
            f"{uri}: no column of image URIs (uri, url or path; or bucket and key); its columns: "
            f"{', '.join(names) or 'none'}"
        )
    return {role: name for role, name in roles.items() if role in wanted}


def _columns(batch: pa.RecordBatch, roles: dict[str, str]) -> dict[str, pa.Array]:
    """Sizes as integers, the rest as text with empty values null, whatever the file's types."""
    columns = {}
    for role, name in roles.items():
        if role == "size":
            columns[role] = batch.column(name).cast(pa.int64())
        else:
            text = batch.column(name).cast(pa.string())
            columns[role] = _where(pc.equal(text, ""), NULL, text)
    return columns


def _where(mask: pa.Array, replacement: pa.Array | pa.Scalar, values: pa.Array) -> pa.Array:
    """``values`` with ``replacement`` where ``mask`` holds; computed only if it holds anywhere: an ``if_else``
    on strings costs 0.1-0.5 s per million rows, and the cases it is for (empty values, relative paths) are rare."""
    return pc.if_else(mask, replacement, values) if pc.any(mask).as_py() else values


def _first_row(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    with fs.open(path, "rb", compression="infer") as h:
        line = h.readline()
    return next(csv.reader([line.decode("utf-8-sig")]), [])


def plan(fs: fsspec.AbstractFileSystem, root: str, shard_size: int) -> Iterator[Shard]:
    """Shards of ``shard_size`` consecutive rows, in the manifest's order (it is deterministic: no sort, so
    nothing is held but a batch). Rows that name no image are skipped and counted in one log line: they have
    no URI to read nor to report an error row by."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    pending = None
    n = skipped = 0
    for f in manifest_files(fs, root):
        for rows in read_rows(fs, f):
            images = rows.filter(pc.is_valid(rows["uri"]))
            skipped += rows.num_rows - images.num_rows
            pending = images if pending is None else pa.concat_tables([pending, images])
            while pending.num_rows >= shard_size:
                yield shard_of(n, pending.slice(0, shard_size))
                n, pending = n + 1, pending.slice(shard_size)
    if pending is not None and pending.num_rows:
        yield shard_of(n, pending)
    if skipped:
        log.warning("manifest %s: skipped %d rows naming no image", storage.to_uri(fs, root), skipped)


def shard_of(n: int, rows: pa.Table) -> Shard:
    """The ``n``-th shard; versions when every row has one (they go one per item)."""
    uris, sizes, versions = (tuple(rows[name].to_pylist()) for name in ("uri", "size", "version"))
    return Shard(
        shard_id_for(n, *uris), items=uris, images=len(uris), versions=versions if all(versions) else (), sizes=sizes
    )


def common_base(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """The longest common folder of the manifest's URIs on its own store, from their min and max, streamed."""
    scheme = schemes_of(fs)[0]  # a normalised URI of this store starts with it
    bounds: list[str] = []
    for f in manifest_files(fs, root):
        for uris in read_uris(fs, f):
            own = pc.min_max(uris.filter(pc.fill_null(pc.starts_with(uris, scheme), False)))
            if own["min"].is_valid:
                bounds = [min([*bounds, own["min"].as_py()]), max([*bounds, own["max"].as_py()])]
    if not bounds:
        raise InputError(f"input {storage.to_uri(fs, root)}: the manifest lists no image on {scheme}")
    return common_folder(*bounds)


def given_base(fs: fsspec.AbstractFileSystem, base: str) -> str:
    """``input.base_uri`` as the items are written (a folder URI ending with "/"), on the manifest's store."""
    uri, schemes = Normaliser(fs, "")(base), schemes_of(fs)
    if not uri.startswith(schemes):
        raise ConfigError(f"input.base_uri {base}: not on the manifest's store ({schemes[0]})")
    return uri if uri.endswith("/") else uri + "/"


def read(fs: fsspec.AbstractFileSystem, shard: Shard, base: str, pool: Executor) -> Iterator[Sample]:
    """The shard's images in order, fetched as files.read does; a URI of another store or outside ``base`` is
    an error sample, not a crash (the row says why, the run goes on)."""
    schemes = schemes_of(fs)

    def fetch(uri: str) -> Sample:
        if not uri.startswith(schemes):
            error = f"{uri} is not on the manifest's store ({schemes[0]}): one manifest reads one store"
        elif not uri.startswith(base):
            error = f"{uri} is not under input.base_uri {base}: it has no image id"
        else:
            image_id = uri[len(base) :]
            return Sample(image_id, image_id, uri, fetch_image(fs, fs._strip_protocol(uri)))
        return Sample(error_id(uri), error_id(uri), uri, None, error=error)

    return ordered_prefetch(pool, fetch, shard.items, READ_AHEAD)


@register_layout("manifest")
class ManifestLayout(Layout):
    """A list of image URIs (see the module). A ``.parquet`` manifest needs ``input.layout: manifest``: auto
    takes a Parquet file for the parquet layout's image bytes. No incremental mode (no ``list_inputs``)."""

    file_suffixes = listing_suffixes = (".csv", ".csv.gz", INVENTORY)
    file_kind = f"a manifest (.csv, .csv.gz, {INVENTORY})"
    listing_kind = f"manifests (.csv, .csv.gz, {INVENTORY})"
    priority = 40  # after parquet: a folder of Parquet files is image bytes unless the layout is set
    label_files = True

    def resolve(self, fs: fsspec.AbstractFileSystem, root: str, cfg: InputConfig) -> InputConfig:
        base = given_base(fs, cfg.base_uri) if cfg.base_uri else common_base(fs, root)
        return cfg.model_copy(update={"base_uri": base})

    def plan(self, fs: fsspec.AbstractFileSystem, root: str, cfg: InputConfig, shard_size: int) -> Iterator[Shard]:
        return plan(fs, root, shard_size)

    def read(
        self, fs: fsspec.AbstractFileSystem, root: str, shard: Shard, cfg: InputConfig, pool: Executor
    ) -> Iterator[Sample]:
        return read(fs, shard, cfg.base_uri, pool)
