"""Which shard runs on which actor slot, and when: the pool's bookkeeping as a pure state object.

No Ray and no clock here: the driver loop reports what happened (a shard done, a shard that raised, an actor
that died, a probe's answer) and asks what to send now, passing the time as ``now`` (any monotonic seconds).
So every scheduling rule is unit-tested without a cluster or a sleep.

A slot is a place for one actor; its generation counts the actors that held it, so an event from an actor
that has since been replaced is told apart from one of the actor now in the slot.

A shard whose actor died under it is rerun carefully: image by image, alone on its actor (so the note of
the image it is on names the one that killed the process, not a neighbour's). A careful attempt that dies
on an image not known before has found a killer, which becomes an error row in the next attempt; only
deaths that find none count against the retries.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from pipeline.sources import Shard


def exponential_backoff(attempt: int) -> float:
    """Seconds before a shard that raised ``attempt`` times may run again: 2, 4, 8, ..."""
    return 2.0**attempt


@dataclass(frozen=True)
class Assignment:
    """A shard sent to the actor of ``slot`` in its ``generation``."""

    slot: int
    generation: int
    shard: Shard
    careful: bool = False  # image by image, alone on its actor
    killers: frozenset[str] = frozenset()  # images that killed the process on earlier attempts


class SlotState(Enum):
    READY = "ready"  # its actor takes calls
    RESTARTING = "restarting"  # its actor died and Ray restarts it; a probe is out, no call until it answers
    REPLACING = "replacing"  # its actor is dead for good; the driver starts a new one


class SlotAction(Enum):
    """What the driver must do about a slot after an actor's death was reported."""

    NONE = "none"  # nothing: the slot is already being handled, or the event came from a replaced actor
    PROBE = "probe"  # send the actor a call that waits for Ray's restart, then report ``actor_back``
    REPLACE = "replace"  # kill the actor, start a new one in its slot, then report ``actor_replaced``


class ShardFailed(Exception):
    """A shard failed more times than the retries allow."""

    def __init__(self, shard_id: str, failures: int) -> None:
        super().__init__(f"shard {shard_id} failed {failures} times")
        self.shard_id = shard_id
        self.failures = failures


class SchedulerStuck(RuntimeError):
    """Work is left but no slot has, or will get, an actor to run it."""


class ShardScheduler:
    """The queue of shards, the shards in flight per slot, the retries waiting for their time, failure counts
    per shard and the state of each actor slot.

    ``per_actor`` shards at most are in flight on a slot's current actor. A shard that raised counts as a failure
    of that shard, and so does a careful attempt whose actor died without naming a new killer; its
    ``retries + 1``-th failure raises ``ShardFailed``.
    """

    def __init__(
        self,
        shards: Iterable[Shard],
        actors: int,
        per_actor: int,
        retries: int,
        backoff: Callable[[int], float] = exponential_backoff,
    ) -> None:
        if actors < 1 or per_actor < 1:
            raise ValueError(f"need at least one slot and one shard per slot, got {actors} and {per_actor}")
        self._queue: deque[Shard] = deque(shards)
        self._waiting: list[tuple[float, int, Shard]] = []  # heap of (not before, tie-break, shard)
        self._order = itertools.count()
        self._in_flight: dict[str, Assignment] = {}  # by shard id
        self._load: Counter[tuple[int, int]] = Counter()  # shards in flight per (slot, generation)
        self._states = [SlotState.READY] * actors
        self._generations = [0] * actors
        self._failures: Counter[str] = Counter()
        self._killers: dict[str, frozenset[str]] = {}  # by shard id: the shards to run carefully
        self._per_actor = per_actor
        self._retries = retries
        self._backoff = backoff

    @property
    def done(self) -> bool:
        """Nothing queued, waiting for its retry time, or in flight."""
        return not (self._queue or self._waiting or self._in_flight)

    def failures(self, shard: Shard) -> int:
        """How many times ``shard`` has failed so far."""
        return self._failures[shard.shard_id]

    def assignments(self, now: float) -> list[Assignment]:
        """The shards to send now, each to a ready slot below ``per_actor`` in flight; retries whose time has
        come go first. Raises ``SchedulerStuck`` when work is left that no slot can ever take."""
        self._release_due(now)
        sent = []
        for slot, state in enumerate(self._states):
            key = (slot, self._generations[slot])
            while state is SlotState.READY and self._queue and self._fits(key):
                shard = self._queue.popleft()
                careful = shard.shard_id in self._killers
                sent.append(Assignment(slot, key[1], shard, careful, self._killers.get(shard.shard_id, frozenset())))
                self._in_flight[shard.shard_id] = sent[-1]
                self._load[key] += 1
        if (self._queue or self._waiting) and all(state is SlotState.REPLACING for state in self._states):
            raise SchedulerStuck(f"{len(self._queue) + len(self._waiting)} shards left and no actor to run them")
        return sent

    def next_retry_in(self, now: float) -> float | None:
        """Seconds until the earliest waiting retry may run (0 if it may now); None when no retry waits."""
        return max(0.0, self._waiting[0][0] - now) if self._waiting else None

    def succeeded(self, assignment: Assignment) -> None:
        """The shard is done (even if its actor has been replaced since: its result stands)."""
        self._land(assignment)

    def task_failed(self, assignment: Assignment, now: float) -> float:
        """The shard's own code raised: it waits out a backoff, then goes to the front of the queue.

        Returns the delay in seconds; raises ``ShardFailed`` past the retries."""
        self._land(assignment)
        delay = self._backoff(self._count_failure(assignment.shard))
        heapq.heappush(self._waiting, (now + delay, next(self._order), assignment.shard))
        return delay

    def actor_died(self, assignment: Assignment, for_good: bool, killer: str | None = None) -> SlotAction:
        """The actor's process died under the shard: the shard goes back to the front of the queue at once, for
        any live actor, to be run carefully. ``for_good``: Ray will not restart the actor. ``killer``: the image
        a careful attempt was on. Raises ``ShardFailed`` past the retries."""
        self._land(assignment)
        shard_id, known = assignment.shard.shard_id, self._killers.get(assignment.shard.shard_id, frozenset())
        if killer is not None and killer not in known:
            self._killers[shard_id] = known | {killer}
        elif assignment.careful:
            self._count_failure(assignment.shard)
        else:
            self._killers[shard_id] = known
        self._queue.appendleft(assignment.shard)
        slot = assignment.slot
        if not self._is_current(slot, assignment.generation) or self._states[slot] is not SlotState.READY:
            return SlotAction.NONE
        self._states[slot] = SlotState.REPLACING if for_good else SlotState.RESTARTING
        return SlotAction.REPLACE if for_good else SlotAction.PROBE

    def actor_back(self, slot: int, generation: int) -> None:
        """The probe of a restarting actor answered: the actor takes calls again."""
        if self._is_current(slot, generation) and self._states[slot] is SlotState.RESTARTING:
            self._states[slot] = SlotState.READY

    def probe_failed(self, slot: int, generation: int) -> SlotAction:
        """The probe of a restarting actor failed: its restarts are used up, so a new actor must take the slot."""
        if not self._is_current(slot, generation) or self._states[slot] is not SlotState.RESTARTING:
            return SlotAction.NONE
        self._states[slot] = SlotState.REPLACING
        return SlotAction.REPLACE

    def actor_replaced(self, slot: int) -> None:
        """A new actor holds the slot: the next generation, ready for calls."""
        if self._states[slot] is not SlotState.REPLACING:
            raise ValueError(f"slot {slot} is {self._states[slot].value}, not waiting for a new actor")
        self._generations[slot] += 1
        self._states[slot] = SlotState.READY

    def _fits(self, key: tuple[int, int]) -> bool:
        """The slot's actor can take the shard at the head of the queue: a careful one only when idle, and
        nothing more while it runs one."""
        if any(a.careful and (a.slot, a.generation) == key for a in self._in_flight.values()):
            return False
        if self._queue[0].shard_id in self._killers:
            return self._load[key] == 0
        return self._load[key] < self._per_actor

    def _release_due(self, now: float) -> None:
        due = []
        while self._waiting and self._waiting[0][0] <= now:
            due.append(heapq.heappop(self._waiting)[2])
        self._queue.extendleft(reversed(due))

    def _land(self, assignment: Assignment) -> None:
        if self._in_flight.get(assignment.shard.shard_id) != assignment:
            raise ValueError(f"{assignment} is not in flight")
        del self._in_flight[assignment.shard.shard_id]
        self._load[assignment.slot, assignment.generation] -= 1

    def _count_failure(self, shard: Shard) -> int:
        self._failures[shard.shard_id] += 1
        if self._failures[shard.shard_id] > self._retries:
            raise ShardFailed(shard.shard_id, self._failures[shard.shard_id])
        return self._failures[shard.shard_id]

    def _is_current(self, slot: int, generation: int) -> bool:
        return self._generations[slot] == generation
