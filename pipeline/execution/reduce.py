"""Reading back the totals of many committed stats parts: on the driver for a few, over Ray tasks for many.

A run's own shards bring their totals to the driver as they finish; only the parts committed by an earlier
attempt (a resume) or an earlier increment are read back, from their footers. A few thousand footers take
seconds on the driver's threads; a resume of a million-shard run would take an hour there, so past
``SPREAD_PARTS`` the footers are read by Ray tasks of ``PARTS_PER_TASK`` each, across the cluster, and the
driver adds up one ``Totals`` per task: a two-level tree whose top costs one addition per task.
"""

from __future__ import annotations

from pipeline.config import JobConfig
from pipeline.execution.cluster import connect
from pipeline.outputs import Totals, read_totals

SPREAD_PARTS = 4096  # fewer footers than this are read on the driver
PARTS_PER_TASK = 1024


def committed_totals(
    cfg: JobConfig, paths: list[str], num_classes: int, spread: int = SPREAD_PARTS, per_task: int = PARTS_PER_TASK
) -> Totals:
    """The stats parts at ``paths`` (under the output) summed from their footers."""
    if len(paths) < spread:
        return read_totals(cfg.resolve(cfg.output_uri)[0], paths, num_classes)
    import ray

    connected = connect(cfg)
    try:
        task = ray.remote(num_cpus=1, max_retries=3)(_task_totals)
        pending = [task.remote(cfg, paths[i : i + per_task], num_classes) for i in range(0, len(paths), per_task)]
        total = Totals(num_classes)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            total += ray.get(done[0])
        return total
    finally:
        if connected:
            ray.shutdown()


def _task_totals(cfg: JobConfig, paths: list[str], num_classes: int) -> Totals:
    return read_totals(cfg.resolve(cfg.output_uri)[0], paths, num_classes)
