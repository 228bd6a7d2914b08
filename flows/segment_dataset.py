"""The ``segment-dataset`` flow: plan → infer on Ray actors → reduce and commit → report (artifacts, summary)."""

# No ``from __future__ import annotations`` in flow modules: Prefect validates parameters against the
# annotations, and string annotations fail to resolve when a runner loads this file by path.

import time
from datetime import UTC, datetime

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from tqdm import tqdm

from flows.common import METRICS_KEY, PROGRESS_KEY, STORAGE_RETRIES, SUMMARY_KEY, transient
from flows.parameters import config_parameters
from pipeline.config import JobConfig
from pipeline.execution import run_shards
from pipeline.job import JobPlan, finalize_job, plan_job
from pipeline.outputs import Manifest
from pipeline.report import format_summary, metrics_table, summary_markdown
from pipeline.schedule import job_config, parse_run_date


@task(name="plan", cache_policy=NO_CACHE, retry_condition_fn=transient, **STORAGE_RETRIES)
def plan_task(cfg: JobConfig) -> JobPlan:
    return plan_job(cfg)


@task(name="infer", cache_policy=NO_CACHE)
def infer_task(plan: JobPlan) -> tuple[list, float]:
    logger = get_run_logger()
    pending = plan.pending
    progress = create_progress_artifact(
        100.0 if not pending else 0.0, key=PROGRESS_KEY, description=f"shards committed of {len(pending)} to run"
    )
    if not pending:
        logger.info("all %d shards already committed; nothing to infer", len(plan.shards))
        return [], 0.0
    counts = [s.images for s in pending]
    total = None if None in counts else sum(counts)  # a tar's image count is known only once read
    # The bar shows on a terminal only (disable=None); the log lines reach Prefect everywhere.
    bar = tqdm(total=total, unit="img", desc="segmenting", disable=None)
    done = []

    def on_done(summary) -> None:
        done.append(summary)
        bar.update(summary.images)
        update_progress_artifact(progress, 100.0 * len(done) / len(pending))
        logger.info(
            "shard %s done: %d images, %d errors, %.1fs (%d/%d shards)",
            summary.shard_id,
            summary.images,
            summary.errors,
            summary.seconds,
            len(done),
            len(pending),
        )

    start = time.perf_counter()
    try:
        summaries = run_shards(plan.cfg, plan.run_id, pending, on_done)
    finally:
        bar.close()
    return summaries, time.perf_counter() - start


@task(name="reduce", cache_policy=NO_CACHE, retry_condition_fn=transient, **STORAGE_RETRIES)
def reduce_task(plan: JobPlan, summaries: list, infer_seconds: float) -> dict:
    return finalize_job(plan, summaries, infer_seconds)


@flow(name="segment-dataset")
@config_parameters(JobConfig)
def segment_dataset(config_path: str | None = None, run_date: str | None = None, **fields) -> dict:
    """Segment every image under ``input_uri``; parameters override the YAML at ``config_path``.

    ``{date}`` in the input, labels or output URI becomes ``run_date`` (YYYY-MM-DD), by default the
    date the run was scheduled for, so a nightly deployment writes each night to its own prefix and a
    re-run of a date resumes it.

    Args:
        config_path: a YAML file of job fields (see configs/); parameters given here override it
        run_date: YYYY-MM-DD for {date} in the URIs; default the date the run was scheduled for
    """
    when = parse_run_date(run_date) if run_date else _scheduled_date()
    plan = plan_task(job_config(config_path, fields, when))
    summaries, infer_seconds = infer_task(plan)
    result = reduce_task(plan, summaries, infer_seconds)
    manifest, metrics = Manifest.from_json(result["manifest"]), result["metrics"]
    create_table_artifact(metrics_table(metrics), key=METRICS_KEY, description="dataset and per-class metrics")
    create_markdown_artifact(summary_markdown(manifest, metrics), key=SUMMARY_KEY, description="where, how many")
    get_run_logger().info("\n%s", format_summary(manifest, metrics))
    return result


def _scheduled_date():
    when = flow_run.scheduled_start_time  # now, for a run nobody scheduled
    return (when or datetime.now(UTC)).date()
