"""Planning: list the images under an input URI and cut them into shards with stable ids."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

import fsspec

from pipeline.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Shard:
    """A unit of work, retry and commit: its output files are named after ``shard_id``."""

    shard_id: str
    items: tuple[str, ...]  # image paths relative to the input root, posix style


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


def make_shards(rel_paths: list[str], shard_size: int) -> list[Shard]:
    """Consecutive groups of ``shard_size`` sorted paths; an id is its position plus a digest of its members.

    The same listing and size always give the same ids, and an id never names two different
    groups of images, so a resumed run can trust a committed shard by its id.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    paths = sorted(rel_paths)
    shards = []
    for n, start in enumerate(range(0, len(paths), shard_size)):
        items = tuple(paths[start : start + shard_size])
        digest = hashlib.sha256("\n".join(items).encode()).hexdigest()[:10]
        shards.append(Shard(f"{n:05d}-{digest}", items))
    return shards
