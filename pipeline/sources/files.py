"""The ``files`` layout: loose image files under a prefix, listed, sorted and cut into shards of ``shard_size``."""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import replace
from typing import TYPE_CHECKING

import fsspec

from pipeline import storage
from pipeline.images import IMAGE_EXTENSIONS
from pipeline.sources.base import (
    InputFile,
    Layout,
    Sample,
    Shard,
    content_version,
    increment_shard_id,
    shard_id_for,
)
from pipeline.sources.prefetch import ordered_prefetch
from pipeline.sources.registry import register_layout

if TYPE_CHECKING:
    from pipeline.config import InputConfig


def list_inputs(fs: fsspec.AbstractFileSystem, root: str) -> list[InputFile]:
    """Every image file under ``root`` with its version, sorted by path (hidden files and folders skipped)."""
    prefix = root.rstrip("/") + "/"
    found = []
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(prefix) :] if path.startswith(prefix) else posixpath.basename(path)
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if rel.lower().endswith(IMAGE_EXTENSIONS):
            found.append(InputFile(rel, info["size"], content_version(info)))
    return sorted(found, key=lambda f: f.path)


def list_images(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Relative paths of every image file under ``root``, sorted (hidden files and folders skipped)."""
    return [f.path for f in list_inputs(fs, root)]


def plan(fs: fsspec.AbstractFileSystem, root: str, shard_size: int) -> list[Shard]:
    files = list_inputs(fs, root)
    version = {f.path: f.version for f in files}
    return [replace(s, versions=tuple(version[p] for p in s.items)) for s in make_shards(list(version), shard_size)]


def make_shards(rel_paths: list[str], shard_size: int) -> list[Shard]:
    """Consecutive groups of ``shard_size`` sorted paths."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    paths = sorted(rel_paths)
    shards = []
    for n, start in enumerate(range(0, len(paths), shard_size)):
        items = tuple(paths[start : start + shard_size])
        shards.append(Shard(shard_id_for(n, *items), items=items, images=len(items)))
    return shards


def plan_increment(files: list[InputFile], shard_size: int, increment: int) -> list[Shard]:
    """Shards of ``files`` for an incremental run, cut where ``stable_groups`` cuts and named by what they hold."""
    shards = []
    for group in stable_groups(sorted(files, key=lambda f: f.path), shard_size):
        items, versions = tuple(f.path for f in group), tuple(f.version for f in group)
        shard_id = increment_shard_id(increment, *(f"{p}@{v}" for p, v in zip(items, versions, strict=True)))
        shards.append(Shard(shard_id, items=items, images=len(items), versions=versions, increment=increment))
    return shards


def stable_groups(files: list[InputFile], shard_size: int) -> list[list[InputFile]]:
    """Consecutive files, cut after a file whose path hashes to a cut (one in ``shard_size``) or after twice
    ``shard_size`` files. A cut depends on its own path (and, past the cap, on the group's first), so
    leaving whole groups out (a resumed increment skipping its committed shards) or adding a file (one that
    arrived meanwhile) changes no other group: their shard ids, and so their committed parts, still match."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    groups, group = [], []
    for f in files:
        group.append(f)
        cut = int.from_bytes(hashlib.sha256(f.path.encode()).digest()[:8], "big") % shard_size == 0
        if cut or len(group) == 2 * shard_size:
            groups.append(group)
            group = []
    return groups + [group] if group else groups


def read(fs: fsspec.AbstractFileSystem, root: str, shard: Shard, pool: Executor, ahead: int = 16) -> Iterator[Sample]:
    """The shard's images in order, fetched ``ahead`` at a time concurrently: one GET per image, many in flight."""

    def fetch(rel: str) -> Sample:
        path = storage.join(root, rel)
        return Sample(rel, rel, storage.to_uri(fs, path), read_optional(fs, path))

    return ordered_prefetch(pool, fetch, shard.items, ahead)


def read_optional(fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    """None for a missing object. Other storage errors propagate: the shard fails and is retried whole,
    rather than a passing outage being written down as a bad image."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


@register_layout("files")
class FilesLayout(Layout):
    """Loose images; a folder holding any image is this layout, ahead of tars and Parquet files."""

    listing_suffixes = IMAGE_EXTENSIONS
    listing_kind = f"images ({', '.join(IMAGE_EXTENSIONS)})"
    priority = 10
    label_files = True

    def plan(self, fs: fsspec.AbstractFileSystem, root: str, cfg: InputConfig, shard_size: int) -> list[Shard]:
        return plan(fs, root, shard_size)

    def list_inputs(self, fs: fsspec.AbstractFileSystem, root: str, cfg: InputConfig) -> list[InputFile]:
        return list_inputs(fs, root)

    def plan_increment(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        cfg: InputConfig,
        files: list[InputFile],
        shard_size: int,
        increment: int,
    ) -> list[Shard]:
        return plan_increment(files, shard_size, increment)

    def read(
        self, fs: fsspec.AbstractFileSystem, root: str, shard: Shard, cfg: InputConfig, pool: Executor
    ) -> Iterator[Sample]:
        return read(fs, root, shard, pool)
