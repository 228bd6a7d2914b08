"""Input layouts: how a job's images are listed, cut into shards, and streamed back as samples.

Three layouts, one module each, all with the same two steps:

- ``plan(fs, root, ...) -> list[Shard]`` lists the input once, on the driver;
- ``read(fs, root, shard, ...) -> Iterator[Sample]`` streams one shard's samples, in a stable order,
  on an actor, holding no more than a bounded window of encoded images in memory.

``files`` is loose image files under a prefix, ``webdataset`` is tar shards (one tar = one shard),
``parquet`` is files with an image-bytes column (one file or a row-group range = one shard).
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

import fsspec

from pipeline.storage import join


@dataclass(frozen=True)
class Shard:
    """A unit of work, retry and commit: its output files are named after ``shard_id``."""

    shard_id: str
    items: tuple[str, ...] = ()  # files layout: image paths relative to the input root, posix style
    member: str | None = None  # webdataset / parquet: the tar or Parquet file, relative to the input root
    row_groups: tuple[int, int] | None = None  # parquet: row groups [start, stop) of ``member``
    images: int | None = None  # how many images it holds, when the listing tells (not for tars)


@dataclass(frozen=True)
class Sample:
    """One image as read from the input, before decoding."""

    image_id: str  # unique within the job; the mask is written to masks/<image_id>.png
    name: str  # the image's file name as annotation tools know it (matched against COCO's file_name)
    source_uri: str  # where it came from: a file URI, or a tar / Parquet URI with a #fragment
    image: bytes | None  # None: listed but gone by the time it was read
    label: bytes | None = None  # a label carried in the input itself (tar member, Parquet column)
    label_uri: str | None = None  # where that label came from
    error: str | None = None  # a reason this sample cannot be processed (e.g. a tar entry without an image)


def shard_id_for(position: int, *members: object) -> str:
    """``NNNNN-<digest>``: its position in the plan plus a digest of what it holds.

    The same listing always gives the same ids, and an id never names two different
    groups of images, so a resumed run can trust a committed shard by its id.
    """
    digest = hashlib.sha256("\n".join(map(str, members)).encode()).hexdigest()[:10]
    return f"{position:05d}-{digest}"


def list_files(
    fs: fsspec.AbstractFileSystem, root: str, suffixes: tuple[str, ...], ignore_prefixes: tuple[str, ...] = (".",)
) -> list[tuple[str, int]]:
    """``(path relative to root, size)`` of every file under ``root`` ending with one of ``suffixes``, sorted.

    Files and folders whose name starts with one of ``ignore_prefixes`` are skipped. A ``root`` that is itself
    such a file lists as its basename: read it back with ``file_path``.
    """
    if root.lower().endswith(suffixes) and fs.isfile(root):
        return [(posixpath.basename(root), fs.size(root))]
    prefix = root.rstrip("/") + "/"
    found = []
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(prefix) :]
        if rel.lower().endswith(suffixes) and not any(part.startswith(ignore_prefixes) for part in rel.split("/")):
            found.append((rel, info["size"]))
    return sorted(found)


def file_path(root: str, member: str) -> str:
    """Where a shard's file is: ``root`` itself when the input is that one file (see ``list_files``)."""
    return root if posixpath.basename(root) == member else join(root, member)
