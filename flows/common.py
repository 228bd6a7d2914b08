"""What the flows share: the retry rule for tasks that touch storage, and artifact keys."""

from __future__ import annotations

from pipeline.errors import SegpipeError

# Stable keys: each run adds a new version of the same artifact, so the latest is one click away.
METRICS_KEY = "segpipe-metrics"
SUMMARY_KEY = "segpipe-summary"
PROGRESS_KEY = "segpipe-progress"
EVALUATION_KEY = "segpipe-evaluation"
REPORT_KEY = "segpipe-report"
DRIFT_KEY = "segpipe-drift"
DRIFTED_TAG = "drifted"

STORAGE_RETRIES = dict(retries=2, retry_delay_seconds=[2, 10])


def transient(task, task_run, state) -> bool:
    """Retry a storage hiccup, not a SegpipeError: a bad config, path or input would fail the same way again."""
    try:
        state.result()
    except SegpipeError:
        return False
    except Exception:
        return True
    return True
