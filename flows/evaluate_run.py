"""The ``evaluate-run`` flow: reduce only. A finished run's masks against labels, read with new settings."""

# No ``from __future__ import annotations``: see flows/segment_dataset.py.

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import EVALUATION_KEY, STORAGE_RETRIES, transient
from flows.parameters import config_parameters
from pipeline.config import EvaluateConfig, load_config
from pipeline.evaluate import evaluate_output
from pipeline.report import metrics_table


@task(name="evaluate", cache_policy=NO_CACHE, retry_condition_fn=transient, **STORAGE_RETRIES)
def evaluate_task(cfg: EvaluateConfig) -> dict:
    return evaluate_output(cfg)


@flow(name="evaluate-run")
@config_parameters(EvaluateConfig)
def evaluate_run(config_path: str | None = None, **fields) -> dict:
    """Write ``evaluations/<name>/metrics.json`` for the run at ``output_uri``; its masks are not touched.

    Args:
        config_path: a YAML file of evaluation fields; parameters given here override it
    """
    doc = evaluate_task(load_config(config_path, schema=EvaluateConfig, **fields))
    create_table_artifact(metrics_table(doc), key=EVALUATION_KEY, description=doc["uri"])
    get_run_logger().info(
        "evaluated %d images (%d labeled, %d label errors): mean IoU %s -> %s",
        doc["images"],
        doc["labeled_images"],
        doc["label_errors"],
        doc["mean_iou"],
        doc["uri"],
    )
    return doc
