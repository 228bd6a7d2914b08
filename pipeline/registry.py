"""A registry in torchvision's style, one per kind of plug-in (models, input layouts, label formats): each
built-in registers itself by decorator when its package is imported; a name given twice is refused, and an
unknown name is an error that lists the known ones.

A registry given an ``entry_point_group`` also takes plugins from installed packages: each entry point of the
group registers ``ep.load()`` under the entry point's name. They are loaded once, the first time a name is
missing or the names are listed; a plugin that fails to load, or takes a built-in's name, is logged, kept in
``failures`` and skipped, so that it breaks neither the others nor the built-ins."""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

BUILT_IN = "built-in"


class Registry(Generic[T]):
    def __init__(self, noun: str, plural: str, entry_point_group: str | None = None) -> None:
        self.noun, self.plural = noun, plural  # as the errors name them: "input layout", "layouts"
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T] = {}
        self._plugins: dict[str, str] = {}  # plugin name -> the distribution it came from
        self.failures: dict[str, str] = {}  # entry point name -> why it was skipped, one line
        self._plugins_loaded = entry_point_group is None

    def add(self, name: str, entry: T) -> None:
        if name in self._entries:
            article = "an" if self.noun[0] in "aeiou" else "a"
            raise ValueError(f"{article} {self.noun} is already registered under the name {name!r}")
        self._entries[name] = entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object itself under ``name``."""

        def wrapper(entry: T) -> T:
            self.add(name, entry)
            return entry

        return wrapper

    def get(self, name: str) -> T:
        if name not in self._entries:
            self._load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names())
            raise ValueError(f"unknown {self.noun} {name!r}; registered {self.plural}: {known}") from None

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def origin(self, name: str) -> str:
        """Where ``name`` comes from: ``"built-in"``, or the name of the package whose plugin it is."""
        self.get(name)  # unknown names are an error here too
        return self._plugins.get(name, BUILT_IN)

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # before loading: a plugin that imports its registry must not recurse
        for ep in entry_points(group=self.entry_point_group):
            dist = ep.dist.name if ep.dist is not None else "unknown package"
            try:
                entry = ep.load()
            except Exception as e:  # ImportError or whatever the plugin's import raises
                error = f"{type(e).__name__}: {e}".splitlines()[0]
            else:
                if self._entries.get(ep.name, entry) is entry:  # free, or the plugin registered it itself
                    self._entries[ep.name] = entry
                    self._plugins[ep.name] = dist
                    continue
                taken_by = self._plugins.get(ep.name)
                error = "the name is taken by " + (f"the plugin of {taken_by}" if taken_by else "a built-in")
            self.failures[ep.name] = f"{ep.value} from {dist}: {error}"
            log.warning("%s plugin %r (%s from %s) skipped: %s", self.noun, ep.name, ep.value, dist, error)
