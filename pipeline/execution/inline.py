"""Running shards in this process, one after another, without Ray."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import JobConfig
from pipeline.shard import ShardProcessor, ShardSummary
from pipeline.sources import Shard


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
