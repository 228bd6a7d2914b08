"""Input layout registry, in the model registry's style: register a Layout class by decorator, look it up by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pipeline.sources.base import Layout

L = TypeVar("L", bound=type[Layout])

_LAYOUTS: dict[str, Layout] = {}


def register_layout(name: str) -> Callable[[L], L]:
    """Class decorator: register one instance of the Layout subclass under ``name``."""

    def wrapper(cls: L) -> L:
        if name in _LAYOUTS:
            raise ValueError(f"an input layout is already registered under the name {name!r}")
        _LAYOUTS[name] = cls()
        return cls

    return wrapper


def list_layouts() -> list[str]:
    return sorted(_LAYOUTS)


def get_layout(name: str) -> Layout:
    """The registered layout ``name``."""
    try:
        return _LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown input layout {name!r}; registered layouts: {', '.join(list_layouts())}") from None
