"""The ``files`` layout: loose image files under a prefix, listed, sorted and cut into shards of ``shard_size``."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING

import fsspec

from pipeline import storage
from pipeline.images import IMAGE_EXTENSIONS
from pipeline.sources.base import Layout, Sample, Shard, shard_id_for
from pipeline.sources.prefetch import ordered_prefetch
from pipeline.sources.registry import register_layout

if TYPE_CHECKING:
    from pipeline.config import InputConfig


def list_images(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Relative paths of every image file under ``root``, sorted (hidden files and folders skipped)."""
    prefix = root.rstrip("/") + "/"
    rels = []
    for path in fs.find(root):
        rel = path[len(prefix) :] if path.startswith(prefix) else posixpath.basename(path)
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if rel.lower().endswith(IMAGE_EXTENSIONS):
            rels.append(rel)
    return sorted(rels)


def plan(fs: fsspec.AbstractFileSystem, root: str, shard_size: int) -> list[Shard]:
    return make_shards(list_images(fs, root), shard_size)


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

    def read(
        self, fs: fsspec.AbstractFileSystem, root: str, shard: Shard, cfg: InputConfig, pool: Executor
    ) -> Iterator[Sample]:
        return read(fs, root, shard, pool)
