"""The shard scheduler without Ray: assignment, retries and backoff, actor deaths, restarts and replacements."""

from __future__ import annotations

import pytest

from pipeline.execution.scheduler import Assignment, SchedulerStuck, ShardFailed, ShardScheduler, SlotAction
from pipeline.sources import Shard


def make_shards(n: int) -> list[Shard]:
    return [Shard(f"{i:05d}-a", items=(f"{i}.png",)) for i in range(n)]


def sent(assignments: list[Assignment]) -> list[tuple[int, str]]:
    return [(a.slot, a.shard.shard_id) for a in assignments]


def test_each_slot_gets_up_to_per_actor_shards_in_queue_order():
    s = ShardScheduler(make_shards(5), actors=2, per_actor=2, retries=2)
    first = s.assignments(0.0)
    assert sent(first) == [(0, "00000-a"), (0, "00001-a"), (1, "00002-a"), (1, "00003-a")]
    assert s.assignments(0.0) == []  # every slot is full
    s.succeeded(first[2])
    assert sent(s.assignments(0.0)) == [(1, "00004-a")]


def test_a_failed_shard_waits_its_backoff_while_other_shards_are_assigned():
    s = ShardScheduler(make_shards(3), actors=1, per_actor=1, retries=3)
    (failed,) = s.assignments(10.0)
    assert s.task_failed(failed, now=10.0) == 2.0
    (other,) = s.assignments(10.0)
    assert other.shard.shard_id == "00001-a"  # not the failed one: its time has not come
    s.succeeded(other)
    (other,) = s.assignments(11.9)
    assert other.shard.shard_id == "00002-a"
    s.succeeded(other)
    assert s.assignments(11.9) == [] and not s.done
    assert sent(s.assignments(12.0)) == [(0, "00000-a")]


def test_a_due_retry_goes_before_the_queued_shards():
    s = ShardScheduler(make_shards(3), actors=1, per_actor=1, retries=3)
    (failed,) = s.assignments(0.0)
    s.task_failed(failed, now=0.0)
    (other,) = s.assignments(0.0)
    s.succeeded(other)
    assert sent(s.assignments(5.0)) == [(0, "00000-a")]  # before 00002-a, queued all along


def test_backoff_doubles_with_each_failure_of_a_shard():
    s = ShardScheduler(make_shards(1), actors=1, per_actor=1, retries=3)
    delays = []
    now = 0.0
    for _ in range(3):
        (job,) = s.assignments(now)
        delays.append(s.task_failed(job, now))
        assert s.assignments(now + delays[-1] - 0.01) == []
        now += delays[-1]
    assert delays == [2.0, 4.0, 8.0]
    assert s.failures(job.shard) == 3


def test_next_retry_in_counts_down_to_the_earliest_waiting_retry():
    s = ShardScheduler(make_shards(2), actors=1, per_actor=2, retries=3, backoff=lambda attempt: 10.0 * attempt)
    assert s.next_retry_in(0.0) is None
    a, b = s.assignments(0.0)
    s.task_failed(a, now=0.0)  # not before 10
    s.task_failed(b, now=3.0)  # not before 13
    assert s.next_retry_in(4.0) == 6.0
    assert s.next_retry_in(11.0) == 0.0  # due: the loop must not wait
    assert sent(s.assignments(11.0)) == [(0, "00000-a")]
    assert s.next_retry_in(11.0) == 2.0
    assert sent(s.assignments(13.0)) == [(0, "00001-a")]
    assert s.next_retry_in(13.0) is None


def test_a_dead_actors_shard_goes_to_the_front_for_another_live_actor():
    s = ShardScheduler(make_shards(4), actors=2, per_actor=1, retries=2)
    on_0, on_1 = s.assignments(0.0)
    assert s.actor_died(on_0, for_good=False) is SlotAction.PROBE
    assert s.assignments(0.0) == []  # slot 1 is busy, slot 0 restarting
    s.succeeded(on_1)
    (again,) = s.assignments(0.0)
    assert (again.slot, again.shard.shard_id) == (1, "00000-a")  # at once, before 00002-a
    assert again.careful and again.killers == frozenset()  # image by image, to find what killed it
    assert s.failures(on_0.shard) == 0  # a first death is not a failure: the careful rerun decides


def test_a_careful_shard_runs_alone_on_its_actor():
    s = ShardScheduler(make_shards(5), actors=2, per_actor=2, retries=2)
    dies, _, first, second = s.assignments(0.0)  # slot 0: shards 0 and 1; slot 1: shards 2 and 3
    s.actor_died(dies, for_good=False)  # slot 0 restarts
    s.succeeded(first)
    assert s.assignments(0.0) == []  # slot 1 still runs a shard: the careful one waits, and so does 4
    s.succeeded(second)
    (careful,) = s.assignments(0.0)  # slot 1 idle: the careful shard, and nothing beside it
    assert (careful.slot, careful.shard, careful.careful) == (1, dies.shard, True)
    s.succeeded(careful)
    assert sent(s.assignments(0.0)) == [(1, "00004-a")]


def test_a_careful_death_that_names_a_new_killer_is_not_a_failure():
    s = ShardScheduler(make_shards(1), actors=1, per_actor=1, retries=1)
    (job,) = s.assignments(0.0)
    s.actor_died(job, for_good=True)
    s.actor_replaced(0)
    for killer in ("a.png", "b.png", "c.png"):  # more killers than retries: each one found is progress
        (job,) = s.assignments(0.0)
        s.actor_died(job, for_good=True, killer=killer)
        s.actor_replaced(0)
    (job,) = s.assignments(0.0)
    assert job.careful and job.killers == frozenset({"a.png", "b.png", "c.png"})
    assert s.failures(job.shard) == 0
    s.succeeded(job)
    assert s.done


def test_careful_deaths_that_find_nothing_new_count_against_the_retries():
    s = ShardScheduler(make_shards(1), actors=1, per_actor=1, retries=1)
    (job,) = s.assignments(0.0)
    s.actor_died(job, for_good=True)  # the first death: careful from now on
    s.actor_replaced(0)
    (job,) = s.assignments(0.0)
    s.actor_died(job, for_good=True, killer="a.png")
    s.actor_replaced(0)
    (job,) = s.assignments(0.0)
    assert job.killers == frozenset({"a.png"})
    s.actor_died(job, for_good=True, killer="a.png")  # the same image again: no progress
    s.actor_replaced(0)
    (job,) = s.assignments(0.0)
    assert s.failures(job.shard) == 1
    with pytest.raises(ShardFailed, match="failed 2 times"):
        s.actor_died(job, for_good=True)  # died outside any image


def test_a_restarting_slot_gets_nothing_until_its_actor_is_back():
    s = ShardScheduler(make_shards(3), actors=1, per_actor=2, retries=2)
    a, b = s.assignments(0.0)
    assert s.actor_died(a, for_good=False) is SlotAction.PROBE
    assert s.actor_died(b, for_good=False) is SlotAction.NONE  # one probe is already out
    assert s.assignments(100.0) == [] and not s.done
    s.actor_back(0, a.generation)
    assert sent(s.assignments(100.0)) == [(0, "00001-a")]  # careful now: one at a time


def test_an_actor_dead_for_good_is_replaced_by_the_next_generation():
    s = ShardScheduler(make_shards(1), actors=1, per_actor=1, retries=2)
    (job,) = s.assignments(0.0)
    assert s.actor_died(job, for_good=True) is SlotAction.REPLACE
    s.actor_replaced(0)
    (again,) = s.assignments(0.0)
    assert (again.slot, again.generation, again.shard, again.careful) == (0, 1, job.shard, True)
    with pytest.raises(ValueError, match="slot 0 is ready"):
        s.actor_replaced(0)  # nothing to replace


def test_a_failed_probe_replaces_the_actor():
    s = ShardScheduler(make_shards(2), actors=1, per_actor=1, retries=2)
    (job,) = s.assignments(0.0)
    s.actor_died(job, for_good=False)
    assert s.probe_failed(0, job.generation) is SlotAction.REPLACE
    assert s.probe_failed(0, job.generation) is SlotAction.NONE  # already being replaced
    s.actor_replaced(0)
    assert [(a.generation, a.shard.shard_id) for a in s.assignments(0.0)] == [(1, "00000-a")]


def test_retries_are_bounded_per_shard_over_both_kinds_of_failure():
    s = ShardScheduler(make_shards(2), actors=1, per_actor=1, retries=2)
    (job,) = s.assignments(0.0)
    s.task_failed(job, now=0.0)
    (other,) = s.assignments(0.0)
    s.actor_died(other, for_good=False)  # another shard's failures do not count against this one
    s.actor_back(0, 0)
    assert s.assignments(1.0) == [Assignment(0, 0, other.shard, careful=True)]
    s.succeeded(Assignment(0, 0, other.shard, careful=True))
    (job,) = s.assignments(2.0)
    assert s.actor_died(job, for_good=True) is SlotAction.REPLACE  # careful from now on, not yet a failure
    s.actor_replaced(0)
    (job,) = s.assignments(2.0)
    s.actor_died(job, for_good=True)  # a careful attempt that died on no image: the second failure
    s.actor_replaced(0)
    (job,) = s.assignments(2.0)
    with pytest.raises(ShardFailed, match="shard 00000-a failed 3 times") as gave_up:
        s.task_failed(job, now=2.0)
    assert (gave_up.value.shard_id, gave_up.value.failures) == ("00000-a", 3)


def test_every_actor_restarting_assigns_nothing_until_one_is_back():
    s = ShardScheduler(make_shards(3), actors=2, per_actor=1, retries=2)
    a, b = s.assignments(0.0)
    s.actor_died(a, for_good=False)
    s.actor_died(b, for_good=False)
    assert s.assignments(50.0) == []  # waiting on the probes, not stuck
    s.actor_back(1, b.generation)
    assert sent(s.assignments(50.0)) == [(1, "00001-a")]


def test_work_left_with_no_actor_coming_is_stuck():
    s = ShardScheduler(make_shards(3), actors=2, per_actor=1, retries=2)
    a, b = s.assignments(0.0)
    s.actor_died(a, for_good=True)
    s.actor_died(b, for_good=True)
    with pytest.raises(SchedulerStuck, match="3 shards left and no actor"):
        s.assignments(0.0)  # both slots wait for new actors that were never reported


def test_more_actors_than_shards_leaves_the_extra_slots_idle():
    s = ShardScheduler(make_shards(2), actors=5, per_actor=2, retries=2)
    jobs = s.assignments(0.0)
    assert sent(jobs) == [(0, "00000-a"), (0, "00001-a")]
    for job in jobs:
        s.succeeded(job)
    assert s.done and s.assignments(0.0) == []


def test_events_from_a_replaced_actor_leave_the_new_one_alone():
    s = ShardScheduler(make_shards(4), actors=1, per_actor=2, retries=2)
    dies, late = s.assignments(0.0)
    assert s.actor_died(dies, for_good=True) is SlotAction.REPLACE
    s.actor_replaced(0)
    new = s.assignments(0.0)  # the new actor takes the careful shard (alone) beside the old one's late shard
    assert [(a.generation, a.shard.shard_id, a.careful) for a in new] == [(1, "00000-a", True)]
    assert s.actor_died(late, for_good=True) is SlotAction.NONE  # the old actor: no second replacement
    s.actor_back(0, 0)  # nor does a stale probe touch the slot
    assert s.probe_failed(0, 0) is SlotAction.NONE
    s.succeeded(new[0])
    assert [(a.generation, a.shard.shard_id, a.careful) for a in s.assignments(0.0)] == [(1, "00001-a", True)]


def test_a_success_from_a_replaced_actor_still_counts():
    s = ShardScheduler(make_shards(2), actors=1, per_actor=2, retries=2)
    dies, finishes = s.assignments(0.0)
    s.actor_died(dies, for_good=True)
    s.actor_replaced(0)
    (redo,) = s.assignments(0.0)
    s.succeeded(finishes)
    s.succeeded(redo)
    assert s.done


def test_an_outcome_for_a_shard_not_in_flight_is_refused():
    s = ShardScheduler(make_shards(1), actors=1, per_actor=1, retries=2)
    (job,) = s.assignments(0.0)
    s.succeeded(job)
    with pytest.raises(ValueError, match="not in flight"):
        s.succeeded(job)
