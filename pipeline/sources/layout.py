"""Choosing the input layout and dispatching plan/read to the registered Layout.

``auto`` decides from the URI first (a single file with one of a layout's ``file_suffixes``), then from a
listing: layouts are tried by ``priority``, so today loose images win, then tars, then Parquet files; the
listing stops at the first image. The driver resolves the layout once and the actors receive it in the config,
so they never list the input themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING

import fsspec

from pipeline.errors import InputError
from pipeline.sources.base import InputFile, Layout, Sample, Shard
from pipeline.sources.listing import iter_files
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


def layout_of_listing(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The layout the folder at ``path`` implies: the first in priority order with a file under it (hidden
    files and folders skipped). The listing stops at the first file of the first layout (loose images), so only
    a folder without one is listed to the end."""
    layouts = [(name, layout.listing_suffixes) for name, layout in by_priority() if layout.listing_suffixes]
    every_suffix = tuple(suffix for _, suffixes in layouts for suffix in suffixes)
    found: set[int] = set()
    for f in iter_files(fs, path, every_suffix):
        lower = f.path.lower()
        found.update(rank for rank, (_, suffixes) in enumerate(layouts) if lower.endswith(suffixes))
        if 0 in found:
            break
    return layouts[min(found)][0] if found else None


def detect_layout(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The layout of the input at ``path``; InputError when nothing segpipe can read is there."""
    if fs.isfile(path):
        name = layout_of_file(path)
        if name is None:
            kinds = [layout.file_kind for _, layout in by_priority() if layout.file_suffixes]
            raise InputError(f"input {path} is a file, but neither {_join(kinds, 'nor')}")
        return name
    name = layout_of_listing(fs, path)
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
        self.layout = detect_layout(fs, root) if cfg.layout == "auto" else cfg.layout
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
