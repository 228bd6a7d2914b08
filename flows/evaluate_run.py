"""The ``evaluate-run`` flow: reduce only. A finished run's masks against labels, read with new settings."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import EVALUATION_KEY, STORAGE_RETRIES, transient
from pipeline.config import EvaluateConfig, LabelsConfig, load_config
from pipeline.evaluate import evaluate_output
from pipeline.report import metrics_table


@task(name="evaluate", cache_policy=NO_CACHE, retry_condition_fn=transient, **STORAGE_RETRIES)
def evaluate_task(cfg: EvaluateConfig) -> dict:
    return evaluate_output(cfg)


@flow(name="evaluate-run")
def evaluate_run(
    output_uri: str | None = None,
    labels_uri: str | None = None,
    labels: LabelsConfig | None = None,
    ignore_classes: list[int] | None = None,
    name: str | None = None,
    config_path: str | None = None,
) -> dict:
    """Write ``evaluations/<name>/metrics.json`` for the run at ``output_uri``; its masks are not touched."""
    cfg = load_config(
        config_path,
        schema=EvaluateConfig,
        output_uri=output_uri,
        labels_uri=labels_uri,
        labels=labels,
        ignore_classes=ignore_classes,
        name=name,
    )
    doc = evaluate_task(cfg)
    create_table_artifact(metrics_table({"metrics": doc}), key=EVALUATION_KEY, description=doc["uri"])
    get_run_logger().info(
        "evaluated %d images (%d labeled, %d label errors): mean IoU %s -> %s",
        doc["images"],
        doc["labeled_images"],
        doc["label_errors"],
        doc["mean_iou"],
        doc["uri"],
    )
    return doc
