"""Listing a folder tree as a stream of files in sorted order, many folders at a time.

``fs.find`` on S3 is one flat listing: 1000 keys a request, one request after another (~2.3 s per 10,000 objects
on the local S3 server), and s3fs keeps every page in ``fs.dircache``, so time and memory grow per object. Here
each folder is one delimiter listing (``ls``); the folders the reader enters next are listed ahead of it,
``concurrency`` at a time; and a listing leaves the cache as soon as it is made, so memory holds the open
folders' listings and a bounded window ahead of the reader, not the input.

Order: sorting one level's entries by name, a folder compared as ``name/``, and expanding each folder in place
gives the global sort of the relative paths, since every path under ``name/`` sorts in one contiguous run there.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice
from operator import itemgetter

import fsspec

from pipeline.sources.base import InputFile, content_version

# Listings in flight: they hide a store's per-request latency. On the local S3 server a listing is bound by the
# s3fs client's CPU instead (~0.2 ms per key), and 1 to 64 take the same time (pipeline.bench.listing).
LISTING_THREADS = 16
AHEAD_PER_THREAD = 2  # folders listed or being listed ahead of the reader, per thread: no thread waits for work


@dataclass(eq=False)
class _Folder:
    """A folder the walk will enter: its path as the filesystem names it, its path relative to the root, and
    its listing (a future) once one was asked for."""

    path: str
    rel: str
    listing: Future | None = None


@dataclass(eq=False)
class _Listing:
    """One folder's entries in the order the walk yields them (matching files and subfolders), and its
    subfolders alone, which the look-ahead walks without passing over the files."""

    entries: list[InputFile | _Folder]
    subfolders: list[_Folder]


@dataclass(eq=False)
class _Open:
    """A folder the reader is in: its subfolders, and how many of them it has entered."""

    subfolders: list[_Folder]
    entered: int = 0


def iter_files(
    fs: fsspec.AbstractFileSystem,
    root: str,
    suffixes: tuple[str, ...],
    ignore_prefixes: tuple[str, ...] = (".",),
    concurrency: int = LISTING_THREADS,
) -> Iterator[InputFile]:
    """Every file under ``root`` whose path relative to ``root`` ends with one of ``suffixes`` (lowercase; any
    case matches; one starting with "/" is a whole name), in the order of that path, streamed as the folders are
    listed.

    Files and folders whose name starts with one of ``ignore_prefixes`` are skipped. A ``root`` that is itself
    such a file lists as its basename (``file_path`` reads it back); a missing ``root`` lists nothing, as
    ``find`` does. ``concurrency=1`` lists one folder at a time, with the same result.
    """
    if root.lower().endswith(suffixes) and fs.isfile(root):
        info = fs.info(root)
        yield InputFile(posixpath.basename(root), info["size"], content_version(info))
        return
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="listing")
    walk = _Walk(partial(_list, fs, suffixes, ignore_prefixes), pool, AHEAD_PER_THREAD * concurrency)
    try:
        yield from walk.files(_Folder(root, ""))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a reader that stops early waits for no listing


class _Walk:
    """The reader's side: enters folders depth first in sorted order, keeping the next ``ahead`` folders it will
    enter (as far as the listings made so far tell) listed or being listed."""

    def __init__(self, list_folder: Callable[[_Folder], _Listing], pool: Executor, ahead: int) -> None:
        self.list_folder, self.pool, self.ahead = list_folder, pool, ahead
        self.open: list[_Open] = []

    def files(self, folder: _Folder) -> Iterator[InputFile]:
        """``folder``'s files, its subfolders' expanded in place."""
        listing = (folder.listing or self.pool.submit(self.list_folder, folder)).result()
        folder.listing = None  # the entries live as long as this call: the tree keeps no listing once entered
        here = _Open(listing.subfolders)
        self.open.append(here)
        self._list_ahead()
        for entry in listing.entries:
            if isinstance(entry, _Folder):
                here.entered += 1
                yield from self.files(entry)
            else:
                yield entry
        self.open.pop()

    def _list_ahead(self) -> None:
        for folder in islice(self._next_folders(), self.ahead):
            if folder.listing is None:
                folder.listing = self.pool.submit(self.list_folder, folder)

    def _next_folders(self) -> Iterator[_Folder]:
        """The folders the reader will enter, in order, as far as the listings made so far tell."""
        for here in reversed(self.open):
            for i in range(here.entered, len(here.subfolders)):
                yield here.subfolders[i]
                yield from _listed_below(here.subfolders[i])


def _listed_below(folder: _Folder) -> Iterator[_Folder]:
    """``folder``'s subfolders in the order the reader will enter them, if its listing is made already."""
    listing = folder.listing
    if listing is None or not listing.done() or listing.exception() is not None:
        return
    for sub in listing.result().subfolders:
        yield sub
        yield from _listed_below(sub)


def _list(
    fs: fsspec.AbstractFileSystem, suffixes: tuple[str, ...], ignore: tuple[str, ...], folder: _Folder
) -> _Listing:
    """One delimiter listing of ``folder``, in walk order. It leaves ``fs``'s cache at once (s3fs caches every
    listing: gigabytes at 100M objects) and is never served from it; a folder gone meanwhile holds nothing."""
    try:
        infos = fs.ls(folder.path, detail=True, refresh=True)
    except FileNotFoundError:
        infos = []
    finally:
        fs.invalidate_cache(folder.path)
    keyed = sorted(filter(None, (_entry(info, folder, suffixes, ignore) for info in infos)), key=itemgetter(0))
    entries = [entry for _, entry in keyed]
    return _Listing(entries, [entry for entry in entries if isinstance(entry, _Folder)])


def _entry(
    info: dict, folder: _Folder, suffixes: tuple[str, ...], ignore: tuple[str, ...]
) -> tuple[str, InputFile | _Folder] | None:
    """``(sort key, entry)`` for one listed item of ``folder``, or None for what the walk skips: an ignored
    name, a file of no suffix, an S3 folder marker (a key ending in "/"), or ``folder`` itself (a root that is
    a file of no suffix lists as itself)."""
    name = info["name"]
    base = name.rsplit("/", 1)[-1]
    if not base or base.startswith(ignore) or name == folder.path:
        return None
    rel = f"{folder.rel}/{base}" if folder.rel else base
    if info["type"] == "directory":
        return f"{base}/", _Folder(name, rel)
    if f"/{rel}".lower().endswith(suffixes):  # "/" + rel: a suffix starting with "/" is a whole name
        return base, InputFile(rel, info["size"], content_version(info))
    return None


def list_files(
    fs: fsspec.AbstractFileSystem, root: str, suffixes: tuple[str, ...], ignore_prefixes: tuple[str, ...] = (".",)
) -> list[InputFile]:
    """Every file under ``root`` ending with one of ``suffixes`` (any case), sorted by path: ``iter_files``, whole.

    Files and folders whose name starts with one of ``ignore_prefixes`` are skipped. A ``root`` that is itself
    such a file lists as its basename: read it back with ``file_path``.
    """
    return list(iter_files(fs, root, suffixes, ignore_prefixes))
