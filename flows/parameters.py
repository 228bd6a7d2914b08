"""Flow parameters derived from a config schema, so that a new config field is one edit.

``@config_parameters(JobConfig)`` gives a flow one keyword parameter per top-level field of the schema
(each optional, None meaning "as in the config file, else the default"), after the flow's own parameters,
with the field descriptions in the docstring, where Prefect reads them for the deployment's parameter form.
A section (``labels``, ``input``, ``storage``) is a mapping of its fields, merged into the config file's
section by ``load_config``, so a run may change one field of it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Optional

from pydantic import BaseModel

from pipeline.config import plain_type, section_schema

KEYWORD = inspect.Parameter.KEYWORD_ONLY


def config_parameters(schema: type[BaseModel]) -> Callable[[Callable], Callable]:
    """Decorate ``def flow_fn(own_param=None, ..., **fields)``: ``fields`` receives the schema's fields."""

    def decorate(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        fields = [_parameter(schema, name) for name in schema.model_fields]
        clash = {p.name for p in own} & {p.name for p in fields}
        if clash:
            raise TypeError(f"{fn.__name__}: parameters {sorted(clash)} are also {schema.__name__} fields")
        params = [p.replace(kind=KEYWORD) for p in own] + fields
        fn.__signature__ = inspect.Signature(params, return_annotation=inspect.signature(fn).return_annotation)
        fn.__annotations__ = {p.name: p.annotation for p in params} | {"return": fn.__signature__.return_annotation}
        fn.__doc__ = _docstring(fn.__doc__ or "", schema)
        return fn

    return decorate


def _parameter(schema: type[BaseModel], name: str) -> inspect.Parameter:
    # A section is a mapping of some of its fields, validated with the rest of the config, not alone.
    section = section_schema(schema, name)
    kind = dict[str, Any] if section else plain_type(schema.model_fields[name].annotation)
    return inspect.Parameter(name, KEYWORD, default=None, annotation=Optional[kind])  # noqa: UP045 (a runtime object)


def _docstring(doc: str, schema: type[BaseModel]) -> str:
    lines = [inspect.cleandoc(doc), "", "Args:"] if "Args:" not in doc else [inspect.cleandoc(doc)]
    for name, info in schema.model_fields.items():
        section = section_schema(schema, name)
        fields = f" (fields: {', '.join(section.model_fields)})" if section else ""
        lines.append(f"    {name}: {info.description or name}{fields}")
    return "\n".join(lines)
