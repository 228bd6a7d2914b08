"""A registry in torchvision's style, one per kind of plug-in (models, input layouts, label formats): each
built-in registers itself by decorator when its package is imported; a name given twice is refused, and an
unknown name is an error that lists the known ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, noun: str, plural: str) -> None:
        self.noun, self.plural = noun, plural  # as the errors name them: "input layout", "layouts"
        self._entries: dict[str, T] = {}

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
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names())
            raise ValueError(f"unknown {self.noun} {name!r}; registered {self.plural}: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)
