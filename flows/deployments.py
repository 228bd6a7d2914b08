"""Deployments served from one process: ``segpipe serve --deployments configs/deployments.yaml``.

- ``segment-dataset/nightly``: a cron schedule; ``{date}`` in its URIs becomes each run's scheduled date;
- ``segment-dataset/adhoc``: no schedule, for ``prefect deployment run 'segment-dataset/adhoc' -p ...``;
- ``evaluate-run/adhoc``: re-evaluate a finished run against labels.

The same deployments for a Kubernetes work pool are in deploy/prefect.yaml (``prefect deploy``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import format_validation_error
from pipeline.errors import ConfigError


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    parameters: dict[str, Any] = Field(default_factory=dict, description="default flow parameters")
    tags: list[str] = Field(default_factory=lambda: ["segpipe"])


class NightlySpec(_Spec):
    cron: str = Field("0 2 * * *", description="when it runs, as cron")
    timezone: str = Field("UTC", description="the cron's time zone")


class DeploymentsConfig(BaseModel):
    """The YAML of ``segpipe serve``: each deployment's defaults; a deployment left out is not served."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nightly: NightlySpec | None = None
    adhoc: _Spec | None = None
    evaluate: _Spec | None = None


def load_deployments_config(path: str | Path) -> DeploymentsConfig:
    try:
        return DeploymentsConfig(**(yaml.safe_load(Path(path).read_text()) or {}))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read deployments file {path}: {e}") from e
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None


def build_deployments(spec: DeploymentsConfig) -> list:
    from prefect.schedules import Cron

    from flows.evaluate_run import evaluate_run
    from flows.segment_dataset import segment_dataset

    for name, flow in (("nightly", segment_dataset), ("adhoc", segment_dataset), ("evaluate", evaluate_run)):
        _check_parameters(name, getattr(spec, name), flow)
    out = []
    if spec.nightly:
        n = spec.nightly
        schedule = Cron(n.cron, timezone=n.timezone)
        out.append(segment_dataset.to_deployment("nightly", schedules=[schedule], parameters=n.parameters, tags=n.tags))
    if spec.adhoc:
        out.append(segment_dataset.to_deployment("adhoc", parameters=spec.adhoc.parameters, tags=spec.adhoc.tags))
    if spec.evaluate:
        e = spec.evaluate
        out.append(evaluate_run.to_deployment("adhoc", parameters=e.parameters, tags=e.tags))
    if not out:
        raise ConfigError("the deployments file names no deployment (nightly, adhoc, evaluate)")
    return out


def _check_parameters(name: str, deployment: _Spec | None, flow) -> None:
    """Every default parameter must be one the flow takes: a typo fails here, not in every run."""
    accepted = inspect.signature(flow.fn).parameters
    unknown = sorted(set(deployment.parameters) - set(accepted)) if deployment else []
    if unknown:
        raise ConfigError(
            f"{name}.parameters: {', '.join(unknown)} not a parameter of {flow.name} (it takes {', '.join(accepted)})"
        )


def serve(path: str | Path, limit: int | None = None) -> None:
    """Register the deployments with the Prefect API and run their flow runs until interrupted."""
    from prefect import serve as prefect_serve

    prefect_serve(*build_deployments(load_deployments_config(path)), limit=limit)
