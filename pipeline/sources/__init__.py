"""Input layouts: how a job's images are listed, cut into shards, and streamed back as samples.

Each layout is one module that registers a ``Layout`` (see ``base``) under its name, with two steps:

- ``plan(fs, root, cfg, shard_size) -> Iterable[Shard]`` lists the input once, on the driver, and yields its
  shards as the listing streams (the driver writes them to the plan file and keeps each one light);
- ``read(fs, root, shard, cfg, pool) -> Iterator[Sample]`` streams one shard's samples, in a stable order,
  on an actor, holding no more than a bounded window of encoded images in memory.

``files`` is loose image files under a prefix, ``webdataset`` is tar shards (one tar = one shard),
``parquet`` is files with an image-bytes column (one file or a row-group range = one shard), ``manifest`` is a
list of image URIs (Parquet, CSV or an S3 Inventory; consecutive rows = one shard).
Importing this package registers them.
"""

from pipeline.sources import files as _files  # noqa: F401  (each module registers its layout)
from pipeline.sources import manifest as _manifest  # noqa: F401
from pipeline.sources import parquet as _parquet  # noqa: F401
from pipeline.sources import webdataset as _webdataset  # noqa: F401
from pipeline.sources.base import (
    InputFile,
    Layout,
    Sample,
    Shard,
    content_version,
    file_path,
    increment_shard_id,
    shard_id_for,
)
from pipeline.sources.listing import list_files
from pipeline.sources.registry import get_layout, list_layouts, register_layout

__all__ = [
    "InputFile",
    "Layout",
    "Sample",
    "Shard",
    "content_version",
    "file_path",
    "increment_shard_id",
    "get_layout",
    "list_files",
    "list_layouts",
    "register_layout",
    "shard_id_for",
]
