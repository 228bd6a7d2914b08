"""Progress as an orchestrator should hear it: at most one line per interval, whatever the shard count.

A line per shard is 1.5 million log records (and as many progress-artifact updates, each an API call) for
100 million images; a line per second is 3,600 an hour. ``Progress`` is pure (the clock is passed in), so its
rule is tested without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.shard import ShardSummary

INTERVAL_SECONDS = 1.0


@dataclass
class Progress:
    """Counts shards as they finish; ``add`` returns a line to report when ``interval`` has passed since the
    last one, or when the last shard is in; None otherwise."""

    shards: int  # to run
    start: float  # clock reading when the run began
    interval: float = INTERVAL_SECONDS
    done: int = 0
    images: int = 0
    errors: int = 0
    _last: float = field(default=float("-inf"), repr=False)
    _since: tuple[int, int, int] = field(default=(0, 0, 0), repr=False)  # done, images, errors at the last line

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.shards if self.shards else 100.0

    def add(self, summary: ShardSummary, now: float) -> str | None:
        self.done += 1
        self.images += summary.images
        self.errors += summary.errors
        if now - self._last < self.interval and self.done < self.shards:
            return None
        shards, images, errors = (
            a - b for a, b in zip((self.done, self.images, self.errors), self._since, strict=True)
        )
        self._last, self._since = now, (self.done, self.images, self.errors)
        rate = self.images / (now - self.start) if now > self.start else 0.0
        return (
            f"{self.done}/{self.shards} shards committed ({self.percent:.1f} %), {self.images} images, "
            f"{self.errors} errors, {rate:.1f} images/s; since the last line: {shards} shards, {images} images, "
            f"{errors} errors"
        )
