"""The ``segment-dataset`` flow: plan → infer on Ray actors → reduce and commit → report (artifacts, summary)."""

# No ``from __future__ import annotations`` in flow modules: Prefect validates parameters against the
# annotations, and string annotations fail to resolve when a runner loads this file by path.

import time
from datetime import UTC, datetime, timedelta

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote
from tqdm import tqdm

from flows.common import (
    DRIFT_KEY,
    DRIFTED_TAG,
    METRICS_KEY,
    PROGRESS_KEY,
    REPORT_KEY,
    STORAGE_RETRIES,
    SUMMARY_KEY,
    transient,
)
from flows.parameters import config_parameters
from pipeline.config import JobConfig
from pipeline.errors import SegpipeError
from pipeline.execution import run_shards
from pipeline.execution.progress import Progress
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
    progress_id = create_progress_artifact(
        100.0 if not pending else 0.0, key=PROGRESS_KEY, description=f"shards committed of {len(pending)} to run"
    )
    if not plan.shards:
        logger.info("nothing new or changed in the input since the last increment")
        return [], 0.0
    if not pending:
        logger.info("all %d shards already committed; nothing to infer", len(plan.shards))
        return [], 0.0
    counts = [s.images for s in pending]
    total = None if None in counts else sum(counts)  # a tar's image count is known only once read
    # The bar shows on a terminal only (disable=None); the log lines reach Prefect everywhere.
    bar = tqdm(total=total, unit="img", desc="segmenting", disable=None)
    # One artifact update and one log line a second at most, whatever the shard count: Prefect API calls
    # stay bounded by the run's duration, not its size.
    progress = Progress(len(pending), time.monotonic())

    def on_done(summary) -> None:
        bar.update(summary.images)
        line = progress.add(summary, time.monotonic())
        if line is not None:
            update_progress_artifact(progress_id, progress.percent)
            logger.info(line)

    start = time.perf_counter()
    try:
        summaries = run_shards(plan.cfg, plan.run_id, pending, on_done)
    finally:
        bar.close()
    return summaries, time.perf_counter() - start


@task(name="reduce", cache_policy=NO_CACHE, retry_condition_fn=transient, **STORAGE_RETRIES)
def reduce_task(plan: JobPlan, summaries: list, infer_seconds: float) -> dict:
    return finalize_job(plan, summaries, infer_seconds)


@task(name="report", cache_policy=NO_CACHE)
def report_task(plan: JobPlan, drift_section: str | None) -> str | None:
    """report.html (and the sample's overlays); a run is complete whatever becomes of its report."""
    from pipeline.report.page import write_report

    out = plan.cfg.outputs
    if not out.report:
        return None
    try:
        fs, root = plan.cfg.resolve(plan.cfg.output_uri)
        sample = "sample" if out.overlays == "sample" else "none"
        uri = write_report(fs, root, plan.cfg.resolve, out.gallery, sample, out.overlay_opacity, drift_section or "")
    except Exception as e:
        get_run_logger().warning("report.html not written: %s", e)
        return None
    create_link_artifact(uri, link_text="report.html", key=REPORT_KEY, description="the run's report")
    return uri


@task(name="drift", cache_policy=NO_CACHE, retry_condition_fn=transient, **STORAGE_RETRIES)
def drift_task(cfg: JobConfig, baseline_uri: str) -> str | None:
    """Compare the run with the one at ``baseline_uri`` (the previous date's output), when that one finished;
    the comparison becomes an artifact, and a PSI above ``drift.threshold`` tags the flow run. Returns the
    comparison as a section of the report."""
    from pipeline.outputs import read_manifest
    from pipeline.report import drift

    logger = get_run_logger()
    baseline = cfg.resolve(baseline_uri)
    found = read_manifest(*baseline)
    if found is None or not found.complete:
        logger.info("no finished run at %s to compare with", baseline_uri)
        return None
    try:
        comparison = drift.compare_runs(baseline, cfg.resolve(cfg.output_uri))
    except SegpipeError as e:  # e.g. the baseline's model had other classes: nothing to compare, not a failure
        logger.warning("no drift comparison with %s: %s", baseline_uri, e)
        return None
    threshold = cfg.drift.threshold
    text = drift.to_markdown(comparison, threshold)
    create_markdown_artifact(text, key=DRIFT_KEY, description=f"drift against {baseline_uri}")
    if comparison.psi > threshold:
        logger.warning("drift: PSI %.4f against %s is above %s", comparison.psi, baseline_uri, threshold)
        _tag_flow_run(DRIFTED_TAG)
    return drift.to_section(comparison, threshold)


def _tag_flow_run(tag: str) -> None:
    from prefect.client.orchestration import get_client

    run_id = flow_run.id
    with get_client(sync_client=True) as client:
        tags = set(client.read_flow_run(run_id).tags) | {tag}
        client.update_flow_run(run_id, tags=sorted(tags))


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
    # quote(): Prefect would otherwise walk every shard of the plan looking for futures to wait on.
    summaries, infer_seconds = infer_task(quote(plan))
    result = reduce_task(quote(plan), quote(summaries), infer_seconds)
    manifest, metrics = Manifest.from_json(result["manifest"]), result["metrics"]
    previous = job_config(config_path, fields, when - timedelta(days=1)).output_uri
    # A dated output is compared with the previous date's; the comparison ends the report.
    drift_section = drift_task(plan.cfg, previous) if previous != plan.cfg.output_uri else None
    report_uri = report_task(quote(plan), drift_section)
    create_table_artifact(metrics_table(metrics), key=METRICS_KEY, description="dataset and per-class metrics")
    summary = summary_markdown(manifest, metrics, report_uri, _heatmap(plan, manifest, metrics))
    create_markdown_artifact(summary, key=SUMMARY_KEY, description="where, how many")
    get_run_logger().info("\n%s", format_summary(manifest, metrics))
    return result


def _heatmap(plan: JobPlan, manifest: Manifest, metrics: dict) -> bytes | None:
    """The confusion heatmap as PNG for the summary artifact, when the run is labeled."""
    if not metrics["labeled_pixels"]:
        return None
    from pipeline.outputs import CONFUSION
    from pipeline.report.charts import confusion_heatmap
    from pipeline.report.run_data import read_confusion

    fs, root = plan.cfg.resolve(plan.cfg.output_uri)
    names = manifest.model.class_names
    return confusion_heatmap(read_confusion(fs, f"{root}/{CONFUSION}", len(names)), names, png=True)


def _scheduled_date():
    when = flow_run.scheduled_start_time  # now, for a run nobody scheduled
    return (when or datetime.now(UTC)).date()
