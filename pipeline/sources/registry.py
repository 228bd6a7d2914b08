"""Input layout registry: a Layout class registered by decorator (one instance kept), looked up by name."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.registry import Registry
from pipeline.sources.base import Layout

LAYOUTS: Registry[Layout] = Registry("input layout", "layouts")
list_layouts = LAYOUTS.names


def register_layout(name: str) -> Callable[[type[Layout]], type[Layout]]:
    """Class decorator: register one instance of the Layout subclass under ``name``."""

    def wrapper(cls: type[Layout]) -> type[Layout]:
        LAYOUTS.add(name, cls())
        return cls

    return wrapper


def get_layout(name: str) -> Layout:
    """The registered layout ``name``."""
    return LAYOUTS.get(name)
