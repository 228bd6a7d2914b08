"""Flow parameters are derived from the config schemas: every field is a parameter, described as in the
schema, and a new field needs no other edit; deployments naming a parameter the flow lacks are refused."""

from __future__ import annotations

import inspect

import pytest
import yaml
from pydantic import BaseModel, Field

from flows.evaluate_run import evaluate_run
from flows.parameters import config_parameters
from flows.segment_dataset import segment_dataset
from pipeline.config import EvaluateConfig, JobConfig
from pipeline.errors import ConfigError


def names(flow) -> list[str]:
    return list(inspect.signature(flow.fn).parameters)


def test_segment_dataset_takes_every_job_field():
    assert names(segment_dataset) == ["config_path", "run_date", *JobConfig.model_fields]


def test_evaluate_run_takes_every_evaluation_field():
    assert names(evaluate_run) == ["config_path", *EvaluateConfig.model_fields]


def test_prefects_parameter_schema_carries_types_and_descriptions():
    from prefect.utilities.callables import parameter_schema

    props = parameter_schema(segment_dataset.fn).model_dump()["properties"]
    assert set(props) == {"config_path", "run_date", *JobConfig.model_fields}
    assert props["shard_size"]["description"] == JobConfig.model_fields["shard_size"].description
    assert {"type": "integer"} in props["shard_size"]["anyOf"]
    assert "layout" in props["input"]["description"]  # a section lists its fields


def test_a_partial_section_passes_prefects_validation_and_is_checked_with_the_whole_config():
    """Prefect must not validate a section alone: ``labels: {format: labelme}`` is complete only together
    with the config file's ``classes``."""
    got = segment_dataset.validate_parameters({"labels": {"format": "labelme"}, "shard_size": "4"})
    assert got["labels"] == {"format": "labelme"} and got["shard_size"] == 4


def test_a_new_field_is_a_parameter_with_no_other_edit():
    class Schema(BaseModel):
        size: int = Field(1, description="how big")
        colour: str | None = Field(None, description="a new field")

    @config_parameters(Schema)
    def fn(config_path: str | None = None, **fields) -> dict:
        """A flow body.

        Args:
            config_path: a file
        """
        return fields

    params = inspect.signature(fn).parameters
    assert list(params) == ["config_path", "size", "colour"]
    assert all(p.default is None and p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert "colour: a new field" in fn.__doc__ and "config_path: a file" in fn.__doc__
    assert fn(colour="red") == {"colour": "red"}


def test_a_flow_parameter_that_is_also_a_field_is_refused():
    class Schema(BaseModel):
        config_path: str

    with pytest.raises(TypeError, match="config_path"):
        config_parameters(Schema)(lambda config_path=None, **fields: fields)


def test_deployments_naming_a_parameter_the_flow_lacks_are_refused(tmp_path):
    from flows.deployments import build_deployments, load_deployments_config

    path = tmp_path / "deployments.yaml"
    path.write_text(yaml.safe_dump({"adhoc": {"parameters": {"config_path": "x.yaml", "shard_sise": 3}}}))
    with pytest.raises(ConfigError, match="adhoc.parameters: shard_sise not a parameter of segment-dataset"):
        build_deployments(load_deployments_config(path))
