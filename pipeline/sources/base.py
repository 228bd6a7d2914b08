"""What every input layout shares: shards, samples, the listing helpers, and the Layout interface."""

from __future__ import annotations

import hashlib
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import fsspec

from pipeline.geo.raster import RasterFile
from pipeline.storage import join

if TYPE_CHECKING:
    from pipeline.config import InputConfig


@dataclass(frozen=True, slots=True)
class Shard:
    """A unit of work, retry and commit: its output files are named after ``shard_id``.

    The driver holds shards light (``plan_part`` set, no members): their members are in the run's plan file
    (``pipeline.outputs.plan``), which the actor reads back, so the driver's memory grows per shard, not per image.
    """

    shard_id: str
    items: tuple[str, ...] = ()  # files layout: image paths relative to the input root, posix style
    member: str | None = None  # webdataset / parquet: the tar or Parquet file, relative to the input root
    row_groups: tuple[int, int] | None = None  # parquet: row groups [start, stop) of ``member``
    images: int | None = None  # how many images it holds, when the listing tells (not for tars)
    versions: tuple[str, ...] = ()  # the listed version of each input file: one per item, or member's
    increment: int = 1  # the increment of the output's result set it belongs to (a full run is one)
    sizes: tuple[int | None, ...] = ()  # bytes of each input file as listed: one per item, or member's
    plan_part: int | None = None  # light: the members are in plan/part-<plan_part>.parquet

    def sources(self) -> dict[str, str]:
        """Its input files (relative to the input root) with their listed versions; empty when not listed."""
        return dict(zip(self.items or (self.member,), self.versions, strict=False))


@dataclass(frozen=True)
class InputFile:
    """One input file as listed: its path relative to the input root, its size, and its content version."""

    path: str
    size: int
    version: str


def content_version(info: dict) -> str:
    """The version a listing gives a file, which changes when its content does: the object's ETag where the
    store gives one (S3, GCS, Azure), else its size and modification time (a local disk). The prefix says which."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')  # S3 quotes it
    if etag:
        return f"etag:{etag}"
    mtime = next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated") if info.get(k)), None)
    stamp = mtime.isoformat() if hasattr(mtime, "isoformat") else repr(mtime)
    return f"size+mtime:{info['size']}:{stamp}"


@dataclass(frozen=True)
class Sample:
    """One image as read from the input, before decoding."""

    image_id: str  # unique within the job; the mask is written to masks/<image_id>.png
    name: str  # the image's file name as annotation tools know it (matched against COCO's file_name)
    source_uri: str  # where it came from: a file URI, or a tar / Parquet URI with a #fragment
    image: bytes | RasterFile | None  # a TIFF file is left where it is (read by windows); None: listed but gone
    label: bytes | None = None  # a label carried in the input itself (tar member, Parquet column)
    label_uri: str | None = None  # where that label came from
    error: str | None = None  # a reason this sample cannot be processed (e.g. a tar entry without an image)


class Layout(ABC):
    """One way of laying out a job's images: how it is recognised, listed into shards, and read back.

    ``plan`` runs once, on the driver, as a stream of shards; ``read`` streams one shard's samples in a stable
    order, on an actor, holding no more than a bounded window of encoded images in memory.
    """

    file_suffixes: ClassVar[tuple[str, ...]] = ()
    """Lowercase suffixes that make a single input file this layout (auto-detection)."""
    file_kind: ClassVar[str] = ""
    """Such a file, as an error names it when a single input file is of no layout: "a tar shard (.tar)"."""
    listing_suffixes: ClassVar[tuple[str, ...]] = ()
    """Lowercase suffixes of the files that make a folder this layout (auto-detection)."""
    listing_kind: ClassVar[str] = ""
    """Those files, as an error names them when a folder holds nothing readable: "tar shards"."""
    priority: ClassVar[int] = 100
    """Auto-detection tries layouts from the lowest priority up: the first whose suffixes match wins."""
    label_files: ClassVar[bool] = False
    """True: an image_id is the image's path under the input root, so label files are found by it."""

    @abstractmethod
    def plan(self, fs: fsspec.AbstractFileSystem, root: str, cfg: InputConfig, shard_size: int) -> Iterable[Shard]:
        """List the input under ``root`` once and cut it into shards of about ``shard_size`` images, in a
        stable order. A generator is best: the plan file is written while the listing streams."""

    def resolve(self, fs: fsspec.AbstractFileSystem, root: str, cfg: InputConfig) -> InputConfig:
        """``cfg`` with what the data decides filled in, once on the driver before the run's id is derived
        (as the layout itself is); by default nothing."""
        return cfg

    @abstractmethod
    def read(
        self, fs: fsspec.AbstractFileSystem, root: str, shard: Shard, cfg: InputConfig, pool: Executor
    ) -> Iterator[Sample]:
        """Stream ``shard``'s samples in a stable order; ``pool`` is the actor's IO thread pool."""

    def list_inputs(self, fs: fsspec.AbstractFileSystem, root: str, cfg: InputConfig) -> list[InputFile]:
        """Every input file under ``root`` with its version, sorted: what an incremental run compares with the
        rows already in the output. A layout without it runs in full mode only."""
        raise NotImplementedError

    def plan_increment(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        cfg: InputConfig,
        files: list[InputFile],
        shard_size: int,
        increment: int,
    ) -> list[Shard]:
        """Shards of ``files`` (some of ``list_inputs``) for ``increment``, named by ``increment_shard_id``."""
        raise NotImplementedError

    def sample_name(self, image_id: str) -> str:
        """The image's ``Sample.name`` (what annotation tools call it), recovered from its image_id alone."""
        return image_id


def shard_id_for(position: int, *members: object) -> str:
    """``NNNNN-<digest>``: its position in the plan plus a digest of what it holds.

    The same listing always gives the same ids, and an id never names two different
    groups of images, so a resumed run can trust a committed shard by its id.
    """
    digest = hashlib.sha256("\n".join(map(str, members)).encode()).hexdigest()[:10]
    return f"{position:05d}-{digest}"


def increment_shard_id(increment: int, *members: object) -> str:
    """``iNNNN-<digest>``: a shard of an incremental run, named by its increment and what it holds (file paths
    with their versions), not by its position: the same files give the same id when the increment is resumed,
    however much else the listing gained or lost."""
    digest = hashlib.sha256("\n".join(map(str, members)).encode()).hexdigest()[:10]
    return f"i{increment:04d}-{digest}"


def file_path(root: str, member: str) -> str:
    """Where a shard's file is: ``root`` itself when the input is that one file (see ``list_files``)."""
    return root if posixpath.basename(root) == member else join(root, member)
