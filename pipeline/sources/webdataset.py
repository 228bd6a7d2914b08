"""The ``webdataset`` layout: tar shards as WebDataset writes them, one tar = one shard, streamed member by member.

Members are grouped into samples exactly as ``webdataset.tariterators`` does (without importing it):
non-regular members and ``__meta__`` names are skipped, the key is the path up to the first dot of the
basename and the extension the rest, lowercased; consecutive members with one key are one sample.

A tar that is corrupt or truncated yields the samples before the damage and then one error sample, so the
shard commits and the damage is reported; a failing storage read propagates, so the caller retries the shard.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

import fsspec

from pipeline.images import IMAGE_EXTENSIONS
from pipeline.sources.base import (
    InputFile,
    Layout,
    Sample,
    Shard,
    file_path,
    increment_shard_id,
    shard_id_for,
)
from pipeline.sources.listing import list_files
from pipeline.sources.registry import register_layout
from pipeline.storage import to_uri

if TYPE_CHECKING:
    from pipeline.config import InputConfig

TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
UNREADABLE = "<unreadable>"

_IMAGE_EXTS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator(skip_meta=...)
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def plan(fs: fsspec.AbstractFileSystem, root: str) -> list[Shard]:
    """One shard per tar under ``root`` (or ``root`` itself, a tar); the size in the id tells a rewritten tar."""
    tars = list_files(fs, root, TAR_SUFFIXES)
    return [
        Shard(shard_id_for(n, f.path, f.size), member=f.path, versions=(f.version,), sizes=(f.size,))
        for n, f in enumerate(tars)
    ]


def read(fs: fsspec.AbstractFileSystem, root: str, shard: Shard, label_suffix: str = "seg.png") -> Iterator[Sample]:
    """Stream the tar's samples in tar order, holding only the current sample's image and label.

    A sample's image is its first member (in tar order) with an image extension; its label is the member
    whose extension is ``label_suffix``. A key without an image, or with one extension twice, is an error sample.
    """
    path = file_path(root, shard.member)
    uri = to_uri(fs, path)
    base = _strip_suffix(shard.member)
    done = 0
    with fs.open(path, "rb") as f:
        reads = _StorageReads(f)
        try:
            with tarfile.open(fileobj=reads, mode="r|*", tarinfo=_StrictHeader) as tar:
                for entry in _entries(tar, label_suffix.lower()):
                    yield _sample(entry, base, uri)
                    done += 1
        except (tarfile.TarError, EOFError) as e:
            if reads.failure is not None:
                raise  # the storage failed (asyncio's IncompleteReadError is an EOFError), not the tar
            error = f"tar is corrupt or truncated after {done} samples: {type(e).__name__}: {e}"
            yield Sample(f"{base}/{UNREADABLE}", UNREADABLE, uri, image=None, error=error)


class _StorageReads:
    """The storage file as tarfile sees it, remembering whether a read itself failed.

    The file-like object is all the stream mode needs; the remembered failure is what tells a storage error
    apart from a format error of the same type.
    """

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.failure: Exception | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            return self._f.read(size)
        except Exception as e:
            self.failure = e
            raise


class _StrictHeader(tarfile.TarInfo):
    """Past the first member, tarfile takes a missing, partial or garbled header for the end of the archive;
    here only an end-of-archive block ends it, so a tar cut at a member boundary is reported as truncated."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as e:
            raise tarfile.ReadError(f"{e} at byte {tar.offset}") from e


@dataclass
class _Entry:
    """One key's members, as far as a sample needs them."""

    key: str
    exts: list[str] = field(default_factory=list)
    image: tuple[str, bytes] | None = None  # (member name, data)
    label: tuple[str, bytes] | None = None  # (member name, data)
    duplicate: str | None = None


def _entries(tar: tarfile.TarFile, label_suffix: str) -> Iterator[_Entry]:
    """Consecutive members with one key, as webdataset's group_by_keys; only the image and label are read."""
    entry = None
    while (info := tar.next()) is not None:
        tar.members = []  # stream mode keeps every header read; webdataset clears them the same way
        split = _key_ext(info)
        if split is None:
            continue
        key, ext = split
        if entry is not None and entry.key != key:
            yield entry
            entry = None
        entry = entry or _Entry(key)
        if ext in entry.exts:
            entry.duplicate = entry.duplicate or ext
        elif ext in _IMAGE_EXTS and entry.image is None:
            entry.image = (info.name, tar.extractfile(info).read())
        elif ext == label_suffix:
            entry.label = (info.name, tar.extractfile(info).read())
        entry.exts.append(ext)
    if entry is not None:
        yield entry


def _key_ext(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """``(key, lowercased extension)`` of a member webdataset keeps, else None."""
    if not info.isreg() or _META.match(info.name):
        return None
    match = _KEY_EXT.match(info.name)
    return (match.group(1), match.group(2).lower()) if match else None


def _sample(entry: _Entry, base: str, uri: str) -> Sample:
    label, label_uri = (entry.label[1], f"{uri}#{entry.label[0]}") if entry.label else (None, None)
    if entry.duplicate is not None:
        error = f"tar entry {entry.key} has member {entry.duplicate} twice"
    elif entry.image is None:
        error = f"tar entry {entry.key} has no image member (found: {', '.join(entry.exts)})"
    else:
        name, data = entry.image
        return Sample(f"{base}/{name}", name, f"{uri}#{name}", data, label=label, label_uri=label_uri)
    return Sample(f"{base}/{entry.key}", entry.key, f"{uri}#{entry.key}", image=None, error=error)


def _strip_suffix(rel: str) -> str:
    lower = rel.lower()
    return next((rel[: -len(s)] for s in TAR_SUFFIXES if lower.endswith(s)), rel)


@register_layout("webdataset")
class WebDatasetLayout(Layout):
    """Tar shards; a folder is this layout when it holds tars but no loose images."""

    file_suffixes = listing_suffixes = TAR_SUFFIXES
    file_kind = f"a tar shard ({', '.join(TAR_SUFFIXES)})"
    listing_kind = "tar shards"
    priority = 20

    def plan(self, fs: fsspec.AbstractFileSystem, root: str, cfg: InputConfig, shard_size: int) -> list[Shard]:
        return plan(fs, root)

    def list_inputs(self, fs: fsspec.AbstractFileSystem, root: str, cfg: InputConfig) -> list[InputFile]:
        return list_files(fs, root, TAR_SUFFIXES)

    def plan_increment(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        cfg: InputConfig,
        files: list[InputFile],
        shard_size: int,
        increment: int,
    ) -> list[Shard]:
        shards = []
        for f in files:  # one per tar, named by the tar and its version
            shard_id = increment_shard_id(increment, f.path, f.version)
            shards.append(Shard(shard_id, member=f.path, versions=(f.version,), increment=increment, sizes=(f.size,)))
        return shards

    def read(
        self, fs: fsspec.AbstractFileSystem, root: str, shard: Shard, cfg: InputConfig, pool: Executor
    ) -> Iterator[Sample]:
        return read(fs, root, shard, cfg.label_suffix)

    def sample_name(self, image_id: str) -> str:
        """``<tar>/<member>`` -> the member's basename, which COCO's file_name lookup also matches."""
        return posixpath.basename(image_id)
