"""Running shards in this process, one after another, without Ray."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import JobConfig
from pipeline.shard import ShardProcessor, ShardResults, ShardSummary
from pipeline.sources import Shard


def run_inline(
    cfg: JobConfig,
    run_id: str,
    shards: list[Shard],
    on_done: Callable[[ShardSummary], None] | None = None,
) -> ShardResults:
    """The same work in this process, one shard after another, without Ray: for debugging and tests."""
    if not shards:
        return ShardResults()
    processor = ShardProcessor(cfg, run_id)
    summaries = ShardResults()
    for shard in shards:
        summary = processor(shard)
        summaries.add(summary)
        if on_done:
            on_done(summary)
    return summaries
