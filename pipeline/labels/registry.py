"""Label format registry: a LabelFormat class registered by decorator, looked up by name."""

from __future__ import annotations

from pipeline.labels.base import LabelFormat
from pipeline.registry import Registry

LABEL_FORMATS: Registry[type[LabelFormat]] = Registry("label format", "formats")
register_label_format = LABEL_FORMATS.register
list_label_formats = LABEL_FORMATS.names


def get_label_format(name: str) -> type[LabelFormat]:
    """The LabelFormat class registered as ``name``: its ``from_config`` builds it, its class attributes say
    which options it takes and whether labels_uri is one dataset file."""
    return LABEL_FORMATS.get(name)
