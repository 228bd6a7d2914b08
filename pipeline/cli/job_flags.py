"""``segpipe run``'s flags, derived from JobConfig: one flag per field, sections as dotted names
(``--shard-size 32``, ``--labels.format coco``, ``--storage.endpoint-url http://...``), so a new config
field is a new flag with no edit here. Values are parsed as YAML unless the field is text, then validated
with the rest of the config, so a bad value is reported by its field name."""

from __future__ import annotations

import argparse
import typing
from collections.abc import Iterator
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr

from pipeline.config import plain_type, section_schema

# The URI fields keep their short flags too: --input, --output, --labels, --checkpoint.
SHORT = {"input_uri": "--input", "output_uri": "--output", "labels_uri": "--labels", "checkpoint_uri": "--checkpoint"}
_DEST = "job:"  # argparse dest prefix: job fields apart from the command's own options


def add_config_flags(parser: argparse.ArgumentParser, schema: type[BaseModel]) -> None:
    group = parser.add_argument_group(f"{schema.__name__} fields (override the --config file)")
    for path, info in leaf_fields(schema):
        flags = ["--" + ".".join(p.replace("_", "-") for p in path)]
        if len(path) == 1 and path[0] in SHORT:
            flags.append(SHORT[path[0]])
        group.add_argument(
            *flags, dest=_DEST + ".".join(path), metavar=_metavar(info.annotation), help=info.description
        )


def leaf_fields(schema: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(path, FieldInfo)`` of every field, descending into sections (fields typed as a model)."""
    for name, info in schema.model_fields.items():
        section = section_schema(schema, name)
        if section is not None:
            yield from leaf_fields(section, (*prefix, name))
        else:
            yield (*prefix, name), info


def config_overrides(args: argparse.Namespace, schema: type[BaseModel]) -> dict[str, Any]:
    """The fields given on the command line, nested by section: ``{"shard_size": 32, "labels": {...}}``."""
    infos = dict(leaf_fields(schema))
    out: dict[str, Any] = {}
    for dest, raw in vars(args).items():
        if not dest.startswith(_DEST) or raw is None:
            continue
        path = tuple(dest[len(_DEST) :].split("."))
        value = raw if _is_text(infos[path].annotation) else _parse(raw)
        section = out
        for key in path[:-1]:
            section = section.setdefault(key, {})
        section[path[-1]] = value
    return out


def _metavar(annotation: Any) -> str:
    kinds = [k for k in _kinds(annotation) if k is not type(None)]
    if all(typing.get_origin(k) is typing.Literal for k in kinds):
        return "{" + ",".join(str(v) for k in kinds for v in typing.get_args(k)) + "}"
    names = {str: "TEXT", SecretStr: "TEXT", int: "N", float: "X", bool: "true|false"}
    return "|".join(names.get(k, "auto" if typing.get_origin(k) is typing.Literal else "YAML") for k in kinds)


def _parse(raw: str) -> Any:
    """YAML, so that numbers, booleans, lists and mappings can be written; text that is not YAML stays text."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _is_text(annotation: Any) -> bool:
    """A field whose every non-None type is text (a URI, a name, a secret): its value is taken as written."""
    return all(k in (str, SecretStr) for k in _kinds(annotation) if k is not type(None))


def _kinds(annotation: Any) -> tuple:
    kind = plain_type(annotation)
    return typing.get_args(kind) if typing.get_origin(kind) is typing.Union else (kind,)
