"""Label format registry, in the model registry's style: register a LabelFormat class by decorator, look it up by
name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pipeline.labels.base import LabelFormat

F = TypeVar("F", bound=type[LabelFormat])

_FORMATS: dict[str, type[LabelFormat]] = {}


def register_label_format(name: str) -> Callable[[F], F]:
    """Class decorator: register the LabelFormat subclass under ``name``."""

    def wrapper(cls: F) -> F:
        if name in _FORMATS:
            raise ValueError(f"a label format is already registered under the name {name!r}")
        _FORMATS[name] = cls
        return cls

    return wrapper


def list_label_formats() -> list[str]:
    return sorted(_FORMATS)


def get_label_format(name: str) -> type[LabelFormat]:
    """The LabelFormat class registered as ``name``: its ``from_config`` builds it, its class attributes say
    which options it takes and whether labels_uri is one dataset file."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown label format {name!r}; registered formats: {', '.join(list_label_formats())}"
        ) from None
