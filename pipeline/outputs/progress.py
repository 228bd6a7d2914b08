"""Which image a shard rerun image by image is on: the note that survives its process being killed.

When an actor's process dies, nothing in it can report which image killed it. So a shard rerun after such a
death writes the id of each image to ``_segmenting/<shard>`` before it touches the image, and removes the
note once every row is built; if the process dies again, the driver reads the note and the image it names
becomes an error row in the next rerun, instead of killing every rerun of its shard.
"""

from __future__ import annotations

import fsspec

from pipeline import storage
from pipeline.outputs.paths import segmenting_path


def mark_segmenting(fs: fsspec.AbstractFileSystem, root: str, shard_id: str, image_id: str) -> None:
    storage.write_bytes(fs, segmenting_path(root, shard_id), image_id.encode())


def segmenting_image(fs: fsspec.AbstractFileSystem, root: str, shard_id: str) -> str | None:
    """The image the last careful attempt at ``shard_id`` was on when it stopped, or None."""
    try:
        return fs.cat_file(segmenting_path(root, shard_id)).decode()
    except FileNotFoundError:
        return None


def clear_segmenting(fs: fsspec.AbstractFileSystem, root: str, shard_id: str) -> None:
    try:
        fs.rm_file(segmenting_path(root, shard_id))
    except FileNotFoundError:
        pass
