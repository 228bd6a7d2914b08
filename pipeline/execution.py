"""Ray: a pool of actors, each holding one ShardProcessor (one model resident on its device).

Ray is imported here only, inside functions, so the rest of the core runs without it.
A local Ray is started (and stopped) when no cluster is named and none is running.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from pipeline.config import JobConfig
from pipeline.planning import Shard
from pipeline.shard import ShardProcessor, ShardSummary

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
    try:
        n = min(cfg.actors, len(shards))
        total_cpus = int(ray.cluster_resources().get("CPU", 1))
        use_gpu = cfg.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= n
        cpus = max(1, total_cpus // n)
        worker = ray.remote(ShardProcessor).options(
            num_cpus=cpus,
            num_gpus=1 if use_gpu else 0,
            # A dead actor is restarted and its in-flight shard re-run: shard writes are idempotent.
            max_restarts=2,
            max_task_retries=2,
        )
        actors = [worker.remote(cfg, run_id, torch_threads=cpus) for _ in range(n)]
        pending: dict = {}
        queue = list(shards)
        summaries: list[ShardSummary] = []
        # Two shards in flight per actor: the next one waits in the actor's queue, never idle.
        for i in range(min(2 * n, len(queue))):
            shard = queue.pop(0)
            pending[actors[i % n].__call__.remote(shard)] = i % n
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            idx = pending.pop(ref)
            summary = ray.get(ref)
            summaries.append(summary)
            if on_done:
                on_done(summary)
            if queue:
                pending[actors[idx].__call__.remote(queue.pop(0))] = idx
        for a in actors:
            ray.kill(a)
        return summaries
    finally:
        if started:
            ray.shutdown()
