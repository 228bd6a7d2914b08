"""The ``files`` layout: loose image files under a prefix, listed, sorted and cut into shards of ``shard_size``."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from itertools import islice
from typing import TYPE_CHECKING, TypeVar

import fsspec

from pipeline import storage
from pipeline.geo.raster import RasterFile, is_raster
from pipeline.images import IMAGE_EXTENSIONS
from pipeline.sources.base import (
    InputFile,
    Layout,
    Sample,
    Shard,
    increment_shard_id,
    shard_id_for,
)
from pipeline.sources.listing import iter_files
from pipeline.sources.prefetch import ordered_prefetch
from pipeline.sources.registry import register_layout

if TYPE_CHECKING:
    from pipeline.config import InputConfig

T = TypeVar("T")
READ_AHEAD = 16  # images fetched at once, in order: one GET each, many in flight


def list_inputs(fs: fsspec.AbstractFileSystem, root: str) -> list[InputFile]:
    """Every image file under ``root`` with its version, sorted by path (hidden files and folders skipped)."""
    return list(iter_files(fs, root, IMAGE_EXTENSIONS))


def list_images(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Relative paths of every image file under ``root``, sorted (hidden files and folders skipped)."""
    return [f.path for f in list_inputs(fs, root)]


def plan(fs: fsspec.AbstractFileSystem, root: str, shard_size: int) -> Iterator[Shard]:
    """Shards of ``shard_size`` consecutive images, cut as the sorted listing streams in: the plan is written
    while the input is still being listed, and the driver never holds the whole listing."""
    for n, group in _numbered_groups(iter_files(fs, root, IMAGE_EXTENSIONS), shard_size):
        yield _shard(n, tuple(f.path for f in group), tuple(f.version for f in group), tuple(f.size for f in group))


def make_shards(rel_paths: list[str], shard_size: int) -> list[Shard]:
    """Consecutive groups of ``shard_size`` sorted paths: the shards ``plan`` cuts, without versions."""
    return [_shard(n, group) for n, group in _numbered_groups(sorted(rel_paths), shard_size)]


def _numbered_groups(items: Iterable[T], shard_size: int) -> Iterator[tuple[int, tuple[T, ...]]]:
    """``(n, group)``: consecutive groups of ``shard_size`` items as they stream by, numbered from 0."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    it = iter(items)
    return enumerate(iter(lambda: tuple(islice(it, shard_size)), ()))


def _shard(n: int, items: tuple[str, ...], versions: tuple[str, ...] = (), sizes: tuple[int | None, ...] = ()) -> Shard:
    """The ``n``-th shard of a full plan: named by its position and its paths, so the same listing gives the
    same ids whatever versions and sizes it lists."""
    return Shard(shard_id_for(n, *items), items=items, images=len(items), versions=versions, sizes=sizes)


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


def read(
    fs: fsspec.AbstractFileSystem, root: str, shard: Shard, pool: Executor, ahead: int = READ_AHEAD
) -> Iterator[Sample]:
    """The shard's images in order, fetched ``ahead`` at a time concurrently: one GET per image, many in flight."""

    def fetch(rel: str) -> Sample:
        path = storage.join(root, rel)
        return Sample(rel, rel, storage.to_uri(fs, path), fetch_image(fs, path))

    return ordered_prefetch(pool, fetch, shard.items, ahead)


def fetch_image(fs: fsspec.AbstractFileSystem, path: str) -> bytes | RasterFile | None:
    """An image's bytes, or for a TIFF the file itself: it is read by windows, never fetched whole."""
    return RasterFile(fs, path) if is_raster(path) else read_optional(fs, path)


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

    def plan(self, fs: fsspec.AbstractFileSystem, root: str, cfg: InputConfig, shard_size: int) -> Iterator[Shard]:
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
