"""Choosing the input layout and dispatching plan/read to its module.

``auto`` decides from the URI first (a single .tar or .parquet file), then from one listing:
loose images win, then tars, then Parquet files. The driver resolves the layout once and the
actors receive it in the config, so they never list the input themselves.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from concurrent.futures import Executor

from pipeline.config import InputConfig
from pipeline.errors import InputError
from pipeline.images import IMAGE_EXTENSIONS
from pipeline.sources import Sample, Shard, files, parquet, webdataset

TAR_EXTENSIONS = webdataset.TAR_SUFFIXES
PARQUET_EXTENSIONS = (parquet.SUFFIX,)
_BY_EXTENSION = {**dict.fromkeys(TAR_EXTENSIONS, "webdataset"), **dict.fromkeys(PARQUET_EXTENSIONS, "parquet")}


def layout_of_file(path: str) -> str | None:
    """The layout a single input file implies, or None."""
    lower = path.lower()
    return next((layout for ext, layout in _BY_EXTENSION.items() if lower.endswith(ext)), None)


def detect_layout(fs, path: str) -> str:
    """The layout of the input at ``path``; InputError when nothing segpipe can read is there."""
    if fs.isfile(path):
        layout = layout_of_file(path)
        if layout is None:
            raise InputError(
                f"input {path} is a file, but neither a tar shard ({', '.join(TAR_EXTENSIONS)}) nor Parquet"
            )
        return layout
    names = [p.lower() for p in fs.find(path) if not posixpath.basename(p).startswith(".")]
    for exts, layout in ((IMAGE_EXTENSIONS, "files"), (TAR_EXTENSIONS, "webdataset"), (PARQUET_EXTENSIONS, "parquet")):
        if any(n.endswith(exts) for n in names):
            return layout
    raise InputError(f"input {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}), tar shards or Parquet files")


class InputSource:
    """An input: its filesystem, root and layout; plans shards and streams their samples."""

    def __init__(self, fs, root: str, cfg: InputConfig) -> None:
        self.fs, self.root, self.cfg = fs, root, cfg
        self.layout = cfg.layout if cfg.layout != "auto" else detect_layout(fs, root)

    def plan(self, shard_size: int) -> list[Shard]:
        c = self.cfg
        if self.layout == "files":
            return files.plan(self.fs, self.root, shard_size)
        if self.layout == "webdataset":
            return webdataset.plan(self.fs, self.root)
        return parquet.plan(self.fs, self.root, shard_size, c.image_column, c.label_column, c.id_column)

    def read(self, shard: Shard, pool: Executor) -> Iterator[Sample]:
        c = self.cfg
        if self.layout == "files":
            return files.read(self.fs, self.root, shard, pool)
        if self.layout == "webdataset":
            return webdataset.read(self.fs, self.root, shard, c.label_suffix)
        return parquet.read(self.fs, self.root, shard, c.image_column, c.label_column, c.id_column)
