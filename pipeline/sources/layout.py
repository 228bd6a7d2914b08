"""Choosing the input layout and dispatching plan/read to the registered Layout.

``auto`` decides from the URI first (a single file with one of a layout's ``file_suffixes``), then from one
listing: layouts are tried by ``priority``, so today loose images win, then tars, then Parquet files. The
driver resolves the layout once and the actors receive it in the config, so they never list the input themselves.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING

import fsspec

from pipeline.errors import InputError
from pipeline.sources.base import InputFile, Layout, Sample, Shard
from pipeline.sources.registry import get_layout, list_layouts

if TYPE_CHECKING:
    from pipeline.config import InputConfig


def by_priority() -> list[tuple[str, Layout]]:
    """``(name, layout)`` of every registered layout, in the order auto-detection tries them."""
    return sorted(((name, get_layout(name)) for name in list_layouts()), key=lambda entry: entry[1].priority)


def layout_of_file(path: str) -> str | None:
    """The layout a single input file implies, or None."""
    lower = path.lower()
    return next((name for name, layout in by_priority() if lower.endswith(layout.file_suffixes)), None)


def layout_of_listing(paths: list[str]) -> str | None:
    """The layout a folder's listing (lowercased paths) implies, or None."""
    return next(
        (name for name, layout in by_priority() if any(p.endswith(layout.listing_suffixes) for p in paths)), None
    )


def detect_layout(fs: fsspec.AbstractFileSystem, path: str, found: dict | None = None) -> str:
    """The layout of the input at ``path``; InputError when nothing segpipe can read is there.
    ``found``: the folder's listing (``fs.find(path, detail=True)``), when it was listed already."""
    if found is None and fs.isfile(path):
        name = layout_of_file(path)
        if name is None:
            kinds = [layout.file_kind for _, layout in by_priority() if layout.file_suffixes]
            raise InputError(f"input {path} is a file, but neither {_join(kinds, 'nor')}")
        return name
    paths = found if found is not None else fs.find(path)
    name = layout_of_listing([p.lower() for p in paths if not posixpath.basename(p).startswith(".")])
    if name is None:
        kinds = [layout.listing_kind for _, layout in by_priority() if layout.listing_suffixes]
        raise InputError(f"input {path} holds no {_join(kinds, 'or')}")
    return name


def _join(words: list[str], last: str) -> str:
    """``a, b <last> c``."""
    return f"{', '.join(words[:-1])} {last} {words[-1]}" if len(words) > 1 else "".join(words)


class InputSource:
    """An input: its filesystem, root and layout; plans shards and streams their samples."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, cfg: InputConfig) -> None:
        self.fs, self.root, self.cfg = fs, root, cfg
        if cfg.layout != "auto":
            self.layout = cfg.layout
        elif fs.isfile(root):
            self.layout = detect_layout(fs, root)
        else:
            found = fs.find(root, detail=True)
            self.layout = detect_layout(fs, root, found)
            self.fs = _ListedOnce(fs, root, found)  # planning lists the folder again: reuse this listing
        self._impl = get_layout(self.layout)

    def resolve(self) -> InputConfig:
        """The input config with the layout and what the data decides (``Layout.resolve``) filled in."""
        cfg = self.cfg.model_copy(update={"layout": self.layout})
        return self._impl.resolve(self.fs, self.root, cfg)

    def plan(self, shard_size: int) -> Iterable[Shard]:
        return self._impl.plan(self.fs, self.root, self.cfg, shard_size)

    def list_inputs(self) -> list[InputFile]:
        """Every input file with its version; NotImplementedError when the layout cannot tell them."""
        return self._impl.list_inputs(self.fs, self.root, self.cfg)

    def plan_increment(self, files: list[InputFile], shard_size: int, increment: int) -> list[Shard]:
        return self._impl.plan_increment(self.fs, self.root, self.cfg, files, shard_size, increment)

    def read(self, shard: Shard, pool: Executor) -> Iterator[Sample]:
        return self._impl.read(self.fs, self.root, shard, self.cfg, pool)


class _ListedOnce:
    """``fs``, except that the first ``find`` of ``root`` returns a listing made already (layout detection's):
    on an object store, listing 100k objects takes seconds, and planning would list them twice."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, found: dict) -> None:
        self._fs, self._root, self._found = fs, root, found

    def find(self, path: str, *args, detail: bool = False, **kwargs):
        if path != self._root or args or kwargs or self._found is None:
            return self._fs.find(path, *args, detail=detail, **kwargs)
        found, self._found = self._found, None  # once: a later plan lists afresh
        return found if detail else sorted(found)

    def __getattr__(self, name: str):
        return getattr(self._fs, name)
