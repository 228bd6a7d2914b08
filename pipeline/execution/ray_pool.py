"""Shards on a pool of Ray actors, each holding one ShardProcessor (one model resident on its device).

A thin loop around ``ShardScheduler``: it sends what the scheduler assigns, waits for the first call to return
(or for the next retry's time), and reports the outcome back. Failures: a shard whose code raised (a storage
outage past the client's retries) is rerun after a backoff, while other shards keep running; a shard whose
actor process died under it (killed, OOM-killed, crashed) goes back to the front of the queue at once, for any
live actor, while Ray restarts the dead one (or, its restarts used up, a new actor takes its place). Both count
against ``shard_retries`` per shard and are logged with the shard's id. Redoing is safe: a shard's writes are
idempotent and its stats part, written last, is its commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from pipeline.config import JobConfig
from pipeline.execution.cluster import connect
from pipeline.execution.resources import ActorPlan, plan_actors
from pipeline.execution.scheduler import Assignment, ShardFailed, ShardScheduler, SlotAction
from pipeline.outputs.progress import segmenting_image
from pipeline.shard import ShardProcessor, ShardResults, ShardSummary
from pipeline.sources import Shard

log = logging.getLogger(__name__)

ACTOR_RESTARTS = 2  # by Ray, per actor, after its process dies; then the driver starts a new actor
SHARDS_PER_ACTOR = 2  # run at once by each (threaded) actor: one reads while the other holds the model


def run_shards(
    cfg: JobConfig,
    run_id: str,
    shards: list[Shard],
    on_done: Callable[[ShardSummary], None] | None = None,
) -> ShardResults:
    """Process ``shards`` on a pool of Ray actors (see ``plan_actors``); summaries arrive in completion order."""
    if not shards:
        return ShardResults()
    import ray

    connected = connect(cfg)
    pool = None
    try:
        plan = _plan(cfg, ray.cluster_resources(), len(shards))
        pool = _ActorPool(cfg, run_id, plan, ShardScheduler(shards, plan.actors, SHARDS_PER_ACTOR, cfg.shard_retries))
        return pool.run(on_done)
    finally:
        if pool is not None:
            pool.kill()
        if connected:
            # Stops a Ray this job started; from a cluster it joined, only disconnects.
            ray.shutdown()


def _plan(cfg: JobConfig, resources: dict[str, float], pending: int) -> ActorPlan:
    plan = plan_actors(cfg, resources, pending)
    if plan.actors * plan.cpus > resources.get("CPU", 0) or plan.actors * plan.gpus > resources.get("GPU", 0):
        log.warning(
            "%d actors with %g CPUs and %g GPUs each do not all fit in the cluster (%g CPUs, %g GPUs): "
            "some wait until nodes join",
            plan.actors,
            plan.cpus,
            plan.gpus,
            resources.get("CPU", 0),
            resources.get("GPU", 0),
        )
    log.info(
        "%d actors, each with %g CPUs (%d torch threads) and %g GPUs",
        plan.actors,
        plan.cpus,
        plan.torch_threads,
        plan.gpus,
    )
    return plan


class _Probe(NamedTuple):
    """A call that returns once the restarting actor of ``slot`` (in ``generation``) is back."""

    slot: int
    generation: int


class _ActorPool:
    """The actors of one job and the calls in flight on them, driven by the scheduler's decisions."""

    def __init__(self, cfg: JobConfig, run_id: str, plan: ActorPlan, scheduler: ShardScheduler) -> None:
        import ray

        self._worker = ray.remote(ShardProcessor).options(
            num_cpus=plan.cpus,
            num_gpus=plan.gpus,
            # Ray replaces an actor whose process died. Its in-flight shards are redone by the scheduler rather
            # than by Ray's own task retries, so that each redo is logged and counts against shard_retries.
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=0,
            max_concurrency=SHARDS_PER_ACTOR,
        )
        self._args = (cfg, run_id)
        self._output = cfg.resolve(cfg.output_uri)  # where a careful attempt notes the image it is on
        self._torch_threads = plan.torch_threads
        self._retries = cfg.shard_retries
        self._scheduler = scheduler
        self._actors: list[Any] = [self._new_actor() for _ in range(plan.actors)]
        self._pending: dict[Any, Assignment | _Probe] = {}  # object ref -> what it answers
        self._node_ips: dict[str, str] = {}

    def run(self, on_done: Callable[[ShardSummary], None] | None) -> ShardResults:
        """Until every shard is done; raises the last error of a shard that failed past its retries."""
        import ray

        summaries = ShardResults()
        while not self._scheduler.done:
            now = time.monotonic()
            for job in self._scheduler.assignments(now):
                call = self._actors[job.slot].__call__.remote(job.shard, job.careful, job.killers)
                self._pending[call] = job
            retry_in = self._scheduler.next_retry_in(now)
            if not self._pending:  # only retries waiting for their time (so retry_in is set): nothing to collect
                time.sleep(retry_in)
                continue
            ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=retry_in)
            for ref in ready:
                summary = self._collect(ref)
                if summary is not None:
                    summaries.add(summary)
                    if on_done:
                        on_done(summary)
        return summaries

    def kill(self) -> None:
        """Stop every actor of the pool (their calls still running fail)."""
        import ray

        for actor in self._actors:
            ray.kill(actor)

    def _new_actor(self) -> Any:
        return self._worker.remote(*self._args, torch_threads=self._torch_threads)

    def _collect(self, ref: Any) -> ShardSummary | None:
        import ray

        job = self._pending.pop(ref)
        if isinstance(job, _Probe):
            self._probed(ref, job)
            return None
        try:
            summary = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            self._task_failed(job, e)
            return None
        except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError) as e:
            self._actor_died(job, e)
            return None
        self._scheduler.succeeded(job)
        self._log_node(summary, job.slot)
        return summary

    def _task_failed(self, job: Assignment, error: Exception) -> None:
        # A storage outage that outlasted the client's own retries. Shard writes are
        # idempotent and the part is written last, so running the shard again is safe.
        with _giving_up_on(error):
            delay = self._scheduler.task_failed(job, time.monotonic())
        log.warning("shard %s failed (%s); retrying in %ds", job.shard.shard_id, getattr(error, "cause", error), delay)

    def _actor_died(self, job: Assignment, error: Exception) -> None:
        # The actor's process died mid-shard (killed, OOM-killed, crashed, its node lost). Ray restarts the actor
        # (ActorUnavailableError); a probe that waits for the restart keeps calls off it until it is back.
        # ActorDiedError: it will not come back (restarts used up, or its __init__ failed): a new actor is needed.
        import ray

        killer = segmenting_image(*self._output, job.shard.shard_id) if job.careful else None
        with _giving_up_on(error):
            action = self._scheduler.actor_died(
                job, for_good=isinstance(error, ray.exceptions.ActorDiedError), killer=killer
            )
        if killer is not None:
            log.warning(
                "shard %s: image %s killed its actor %d (%s); rerunning the shard with that image as an error row",
                job.shard.shard_id,
                killer,
                job.slot,
                _first_line(error),
            )
        else:
            log.warning(
                "shard %s redone image by image (failures %d of %d allowed): its actor %d died (%s: %s)",
                job.shard.shard_id,
                self._scheduler.failures(job.shard),
                self._retries,
                job.slot,
                type(error).__name__,
                _first_line(error),
            )
        self._act(action, job.slot, job.generation, _first_line(error))

    def _probed(self, ref: Any, probe: _Probe) -> None:
        import ray

        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._act(self._scheduler.probe_failed(*probe), *probe, _first_line(e))
        else:
            self._scheduler.actor_back(*probe)

    def _act(self, action: SlotAction, slot: int, generation: int, why: str) -> None:
        import ray

        if action is SlotAction.PROBE:
            probe = self._actors[slot].__ray_ready__.options(max_task_retries=-1).remote()
            self._pending[probe] = _Probe(slot, generation)
        elif action is SlotAction.REPLACE:
            log.warning("actor %d is dead for good (%s); starting a new one", slot, why)
            ray.kill(self._actors[slot])
            self._actors[slot] = self._new_actor()
            self._scheduler.actor_replaced(slot)

    def _log_node(self, summary: ShardSummary, slot: int) -> None:
        import ray

        if summary.node not in self._node_ips:
            self._node_ips.update({n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()})
        log.info(
            "shard %s ran on node %s (%s), actor %d",
            summary.shard_id,
            summary.node,
            self._node_ips.get(summary.node, "?"),
            slot,
        )


@contextmanager
def _giving_up_on(error: Exception) -> Iterator[None]:
    """Past a shard's retries: log it and raise ``error``, the shard's last failure."""
    try:
        yield
    except ShardFailed as gave_up:
        log.error("shard %s failed %d times; giving up", gave_up.shard_id, gave_up.failures)
        raise error from gave_up


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
