"""Incremental runs: one output holds one result set, which each run brings up to date with the input.

A run (an increment) lists the input with each file's version (``sources.base.content_version``: the ETag, or
size and modification time), reads which files at which versions the parts the output's manifest commits
hold (each part's footer names them), and segments only the files that are new or whose version changed,
into new stats parts (``i<N>-...``). When it commits:

1. each earlier part holding rows that leave the set (of the changed files, and with ``prune_deleted`` of the
   files deleted from the input) is written again without them, as a new part (``r<N>-...``);
2. metrics are reduced over the current parts, and ``manifest.json`` is written last: it names every current
   part (``shards``) and every increment;
3. only then are the replaced parts deleted, and the masks of images that left the set.

No part is ever rewritten in place, and a killed increment leaves the manifest naming the previous set whole:
its rerun plans the same shards (``files.stable_groups``, ``increment_shard_id``), keeps the ones committed,
and removes the parts no manifest names (see ``job``).
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import InputError
from pipeline.outputs import (
    MASK_SUFFIXES,
    Increment,
    Manifest,
    mask_path,
    overlay_path,
    part_run_id,
    part_sources,
    read_sources,
    stats_metadata,
    stats_path,
    vectors_path,
    write_table,
)
from pipeline.outputs.totals import Totals
from pipeline.sources import InputFile

log = logging.getLogger(__name__)

_THREADS = 16  # parts rewritten, files deleted at once


@dataclass(frozen=True)
class Committed:
    """The rows of an output's finished increments, as far as planning the next one needs them."""

    versions: dict[str, str | None] = field(default_factory=dict)  # input file -> the version its rows are of
    files: dict[str, frozenset[str]] = field(default_factory=dict)  # current part -> the input files of its rows
    rows: dict[str, int] = field(default_factory=dict)  # current part -> its rows


@dataclass(frozen=True)
class Changes:
    """The input against the result set: files to segment, and files the set holds that are gone."""

    new: list[InputFile]
    changed: list[InputFile]
    deleted: list[str]

    @property
    def todo(self) -> list[InputFile]:
        return sorted(self.new + self.changed, key=lambda f: f.path)


@dataclass(frozen=True)
class IncrementPlan:
    """What one increment does to the result set; a full run is the one increment of its output."""

    number: int
    earlier: list[Increment] = field(default_factory=list)  # the output's finished increments
    kept: dict[str, int] = field(default_factory=dict)  # earlier parts left as they are -> rows
    replaced: list[str] = field(default_factory=list)  # earlier parts holding rows that leave the set
    leaving: frozenset[str] = frozenset()  # input files whose earlier rows leave the set
    new_files: int = 0
    changed_files: int = 0
    deleted_files: int = 0
    pruned_files: int = 0


def read_committed(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest | None) -> Committed:
    """The input files and versions the parts ``manifest`` commits name (their footers, not their rows); an
    empty set for no manifest."""
    if manifest is None:
        return Committed()
    keys = [s.shard_id for s in manifest.shards]
    out = Committed()
    for key, (sources, rows) in zip(keys, read_sources(fs, [stats_path(root, k) for k in keys]), strict=True):
        if sources is None:
            raise InputError(
                f"output {storage.to_uri(fs, root)}: part-{key}.parquet names no input file versions (written "
                "before segpipe ran incrementally, or from a layout that lists none); start it in a new output"
            )
        out.versions.update(sources)
        out.files[key], out.rows[key] = frozenset(sources), rows
    return out


def find_changes(listing: list[InputFile], versions: dict[str, str | None]) -> Changes:
    """Files of ``listing`` not in ``versions`` (new) or listed at another version (changed); files of
    ``versions`` no longer listed (deleted)."""
    listed = {f.path for f in listing}
    return Changes(
        new=[f for f in listing if f.path not in versions],
        changed=[f for f in listing if f.path in versions and versions[f.path] != f.version],
        deleted=sorted(set(versions) - listed),
    )


def plan_changes(
    number: int, earlier: list[Increment], committed: Committed, changes: Changes, prune_deleted: bool
) -> IncrementPlan:
    """Which earlier parts stay and which are replaced, once the changed (and pruned) files' rows leave."""
    leaving = frozenset(f.path for f in changes.changed) | (frozenset(changes.deleted) if prune_deleted else set())
    replaced = {key for key, files in committed.files.items() if not files.isdisjoint(leaving)}
    return IncrementPlan(
        number=number,
        earlier=earlier,
        kept={key: n for key, n in committed.rows.items() if key not in replaced},
        replaced=sorted(replaced),
        leaving=leaving,
        new_files=len(changes.new),
        changed_files=len(changes.changed),
        deleted_files=len(changes.deleted),
        pruned_files=len(changes.deleted) if prune_deleted else 0,
    )


def rewritten_id(number: int, key: str) -> str:
    """The id of the part that replaces part ``key`` in increment ``number``."""
    return f"r{number:04d}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def replace_parts(
    fs: fsspec.AbstractFileSystem, root: str, plan: IncrementPlan, num_classes: int
) -> tuple[dict[str, int], set[str]]:
    """Write each replaced part again without the leaving rows, under a new id (none when no row stays).

    A part holds the rows of one input file (a tar, a Parquet file) or one row per file, whose image id is the
    file's path (loose files): so a row leaves with its part's one file, or with the file its image id names.
    Returns the new parts with their rows, and the image ids of the rows that left.
    """
    leaving = pa.array(sorted(plan.leaving), pa.string())

    def rewrite(key: str) -> tuple[str, int, list[str]]:
        table = pq.read_table(pa.BufferReader(fs.cat_file(stats_path(root, key))))
        meta = table.schema.metadata
        sources = part_sources(meta) or {}
        stays = {path: version for path, version in sources.items() if path not in plan.leaving}
        gone = pc.is_in(table["image_id"], value_set=leaving) if stays else pa.array([True] * table.num_rows)
        kept = table.filter(pc.invert(gone))
        new_key = rewritten_id(plan.number, key)
        if kept.num_rows:
            _rewrite_vectors(fs, root, key, new_key, leaving)
            write_table(
                fs,
                stats_path(root, new_key),
                kept.replace_schema_metadata(
                    stats_metadata(part_run_id(meta) or "", stays, Totals.of_table(kept, num_classes).to_metadata())
                ),
            )
        return new_key, kept.num_rows, table.filter(gone)["image_id"].to_pylist()

    with ThreadPoolExecutor(_THREADS) as pool:
        done = list(pool.map(rewrite, plan.replaced))
    return {key: rows for key, rows, _ in done if rows}, {i for _, _, left in done for i in left}


def _rewrite_vectors(fs: fsspec.AbstractFileSystem, root: str, key: str, new_key: str, leaving: pa.Array) -> None:
    """The part's polygons (outputs.vectors) without the leaving images', under the new id, before its stats part."""
    try:
        table = pq.read_table(pa.BufferReader(fs.cat_file(vectors_path(root, key))))
    except FileNotFoundError:
        return
    kept = table.filter(pc.invert(pc.is_in(table["image_id"], value_set=leaving)))
    write_table(fs, vectors_path(root, new_key), kept.replace_schema_metadata(table.schema.metadata))


def remove_replaced(fs: fsspec.AbstractFileSystem, root: str, parts: list[str], gone: set[str]) -> None:
    """After the commit: delete the replaced parts, and the masks (and overlays) of images no longer in the set.
    A failure is logged, not raised: the set is committed, and the next run removes parts no manifest names."""
    paths = [stats_path(root, k) for k in parts]
    paths += [vectors_path(root, k) for k in parts]
    masks = [mask_path(root, image_id, suffix) for image_id in sorted(gone) for suffix in MASK_SUFFIXES]
    paths += masks + [overlay_path(root, image_id) for image_id in sorted(gone)]
    try:
        with ThreadPoolExecutor(_THREADS) as pool:
            list(pool.map(lambda path: storage.remove_files(fs, [path]), paths))
    except OSError as e:
        log.warning("could not delete every replaced part and mask (%s): the next run removes the parts", e)
    else:
        log.info("deleted %d replaced parts and the masks of %d images that left the set", len(parts), len(gone))
