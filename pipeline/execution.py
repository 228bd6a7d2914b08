"""Running shards: on a pool of Ray actors, each holding one ShardProcessor (one model resident on its
device), or inline in this process.

Ray is imported here only, inside functions, so the rest of the core runs without it.
A local Ray is started (and stopped) when no cluster is named and none is running.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from pipeline.config import JobConfig
from pipeline.shard import ShardProcessor, ShardSummary
from pipeline.sources import Shard

log = logging.getLogger(__name__)


def _connect(cfg: JobConfig) -> bool:
    """Join the configured cluster or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no calls home
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
    return True


def run_inline(
    cfg: JobConfig,
    run_id: str,
    shards: list[Shard],
    on_done: Callable[[ShardSummary], None] | None = None,
) -> list[ShardSummary]:
    """The same work in this process, one shard after another, without Ray: for debugging and tests."""
    if not shards:
        return []
    processor = ShardProcessor(cfg, run_id)
    summaries = []
    for shard in shards:
        summaries.append(processor(shard))
        if on_done:
            on_done(summaries[-1])
    return summaries


def run_shards(
    cfg: JobConfig,
    run_id: str,
    shards: list[Shard],
    on_done: Callable[[ShardSummary], None] | None = None,
) -> list[ShardSummary]:
    """Process ``shards`` on ``cfg.actors`` Ray actors; summaries arrive in completion order."""
    if not shards:
        return []
    import ray

    started = _connect(cfg)
    actors = []
    try:
        n = min(cfg.actors, len(shards))
        resources = ray.cluster_resources()
        cpus = max(1, int(resources.get("CPU", 1)) // n)
        use_gpu = cfg.device != "cpu" and resources.get("GPU", 0) >= n
        worker = ray.remote(ShardProcessor).options(
            num_cpus=cpus,
            num_gpus=1 if use_gpu else 0,
            # A dead actor is restarted and its in-flight shard re-run: shard writes are idempotent.
            max_restarts=2,
            max_task_retries=2,
            # Two shards run at once in each actor: one reads while the other holds the model.
            max_concurrency=2,
        )
        actors = [worker.remote(cfg, run_id, torch_threads=cpus) for _ in range(n)]
        queue = list(shards)
        pending: dict = {}  # object ref -> (index of the actor working on it, its shard)
        failures: dict[str, int] = {}
        summaries: list[ShardSummary] = []

        def submit(idx: int) -> None:
            shard = queue.pop(0)
            pending[actors[idx].__call__.remote(shard)] = (idx, shard)

        # Two shards per actor, run concurrently by the threaded actor, so reads overlap compute.
        for i in range(min(2 * n, len(queue))):
            submit(i % n)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            idx, shard = pending.pop(ref)
            try:
                summary = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                # A storage outage that outlasted the client's own retries. Shard writes are
                # idempotent and the part is written last, so running the shard again is safe.
                failures[shard.shard_id] = failures.get(shard.shard_id, 0) + 1
                if failures[shard.shard_id] > cfg.shard_retries:
                    raise
                delay = 2 ** failures[shard.shard_id]
                log.warning("shard %s failed (%s); retrying in %ds", shard.shard_id, getattr(e, "cause", e), delay)
                time.sleep(delay)
                queue.insert(0, shard)
                submit(idx)
                continue
            summaries.append(summary)
            if on_done:
                on_done(summary)
            if queue:
                submit(idx)
        return summaries
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
