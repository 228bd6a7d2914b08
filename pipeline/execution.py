"""Running shards: on a pool of Ray actors, each holding one ShardProcessor (one model resident on its
device), or inline in this process.

Ray is imported here only, inside functions, so the rest of the core runs without it. The job joins the
cluster named by ``ray_address`` or ``RAY_ADDRESS`` (and only disconnects from it at the end), or else starts
a local Ray bound to 127.0.0.1 and stops it at the end; a Ray already initialised in this process is reused.

Failures: a shard whose code raised (a storage outage past the client's retries) is rerun after a backoff; a
shard whose actor process died under it (killed, OOM-killed, crashed) goes back to the front of the queue at
once, for any live actor, while Ray restarts the dead one (or, its restarts used up, a new actor takes its
place). Both count against ``shard_retries`` per shard and are logged with the shard's id. Redoing is safe: a
shard's writes are idempotent and its stats part, written last, is its commit.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import JobConfig
from pipeline.shard import ShardProcessor, ShardSummary
from pipeline.sources import Shard

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
ACTOR_RESTARTS = 2  # by Ray, per actor, after its process dies; then the driver starts a new actor
SHARDS_PER_ACTOR = 2  # run at once by each (threaded) actor: one reads while the other holds the model


def _connect(cfg: JobConfig) -> bool:
    """Join the configured cluster or start a local Ray; True when this call connected (so must disconnect)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no calls home
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        # Only a driver connection: the cluster runs its own dashboard and services, and outlives the job.
        # (No other keyword: through the Ray client, ray:// addresses, non-default ones go to the server.)
        ray.init(address=address, log_to_driver=True)
        res = ray.cluster_resources()
        nodes = sum(n["Alive"] for n in ray.nodes())
        log.info(
            "joined the Ray cluster at %s: %d nodes, %g CPUs, %g GPUs",
            address,
            nodes,
            res.get("CPU", 0),
            res.get("GPU", 0),
        )
    else:
        _start_local(ray)
    return True


def _start_local(ray) -> None:
    """A Ray for this job alone, on this machine, reachable on 127.0.0.1 only.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone does not do it on Linux: Ray replaces a loopback node
    address by the machine's outward IP (``services.resolve_ip_for_localhost``, so that other nodes could
    join) and its servers (GCS, raylet, workers) then listen on every interface. With Ray's multi-node mode
    off, which is what ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` selects when set before Ray is imported, the
    node keeps 127.0.0.1 and every server binds to loopback; Ray reads the flag (``ENABLE_RAY_CLUSTER``) when
    it picks the node's address, so it is turned off for the duration of ``ray.init`` only.
    ``address="local"`` starts a new instance even when a ``ray start`` cluster on this machine left its
    address in /tmp/ray (a bare ``ray.init()`` would join it).
    """
    try:
        from ray._private import ray_constants

        multi_node = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # another Ray version: the address still asks for loopback
        ray_constants = None
    try:
        ray.init(
            address="local",
            _node_ip_address=LOOPBACK,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )
    finally:
        if ray_constants is not None:
            ray_constants.ENABLE_RAY_CLUSTER = multi_node
    ip = ray.util.get_node_ip_address()
    if ip != LOOPBACK:
        log.warning("the local Ray runs on %s, not %s only", ip, LOOPBACK)
    log.info("started a local Ray on %s: %g CPUs", ip, ray.cluster_resources().get("CPU", 0))


@dataclass(frozen=True)
class ActorPlan:
    """How many actors, and what each reserves from the cluster."""

    actors: int
    cpus: float
    gpus: float

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.cpus))


def gpu_share(actors: int, gpus: float) -> float:
    """What each of ``actors`` actors reserves of ``gpus`` GPUs: a whole one if there are enough, else an
    even share that packs (3 actors on 2 GPUs: 0.5 each, since 0.75 would fit only one per GPU)."""
    if gpus < 1:
        return 0.0
    return 1.0 / math.ceil(actors / int(gpus))


def plan_actors(cfg: JobConfig, resources: dict[str, float], pending: int) -> ActorPlan:
    """Actors and their resources from the config and the cluster's total ``resources`` (``ray.cluster_resources()``).

    ``actors: auto`` is one actor per ``gpus_per_actor`` GPUs of the cluster when GPUs are used, else one per
    ``cpus_per_actor`` CPUs (1 when unset); never more actors than ``pending`` shards, never fewer than one.
    Left out, ``gpus_per_actor`` is 0 when the device is ``cpu`` or the cluster has no GPU; otherwise 1 when
    the cluster has one for each actor, else an even share (two actors on one GPU: 0.5 each). Never 0 beside a
    GPU the device may use: Ray hides every GPU from an actor that reserves none (CUDA_VISIBLE_DEVICES=""),
    and ``device: auto`` would then quietly run on the CPU. ``cpus_per_actor`` is the cluster's CPUs shared
    evenly (at least 1).
    """
    cluster_cpus, cluster_gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    may_use_gpu = cfg.device != "cpu"
    if cfg.actors == "auto":
        gpus = cfg.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if may_use_gpu and cluster_gpus >= 1 else 0.0
        per_actor, total = (gpus, cluster_gpus) if gpus else (cfg.cpus_per_actor or 1.0, cluster_cpus)
        n = math.floor(total / per_actor + 1e-9)
    else:
        n = cfg.actors
    n = max(1, min(n, pending))
    if cfg.actors != "auto":
        gpus = cfg.gpus_per_actor
        if gpus is None:
            gpus = gpu_share(n, cluster_gpus) if may_use_gpu else 0.0
    cpus = cfg.cpus_per_actor if cfg.cpus_per_actor is not None else float(max(1, int(cluster_cpus) // n))
    return ActorPlan(actors=n, cpus=cpus, gpus=gpus)


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
    """Process ``shards`` on a pool of Ray actors (see ``plan_actors``); summaries arrive in completion order."""
    if not shards:
        return []
    import ray

    connected = _connect(cfg)
    actors: list = []
    try:
        resources = ray.cluster_resources()
        plan = plan_actors(cfg, resources, len(shards))
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
        worker = ray.remote(ShardProcessor).options(
            num_cpus=plan.cpus,
            num_gpus=plan.gpus,
            # Ray replaces an actor whose process died. Its in-flight shards are redone by the loop below rather
            # than by Ray's own task retries, so that each redo is logged and counts against shard_retries.
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=0,
            max_concurrency=SHARDS_PER_ACTOR,
        )

        def new_actor():
            return worker.remote(cfg, run_id, torch_threads=plan.torch_threads)

        actors = [new_actor() for _ in range(plan.actors)]
        queue = deque(shards)
        pending: dict = {}  # object ref -> (actor slot, the actor handle it went to, its shard or None for a probe)
        inflight = [0] * plan.actors  # shards pending per slot
        restarting: set[int] = set()  # slots whose actor Ray is restarting: a call now would fail at once
        failures: dict[str, int] = {}
        summaries: list[ShardSummary] = []
        node_ips: dict[str, str] = {}

        def fill() -> None:
            for idx in range(plan.actors):
                while queue and idx not in restarting and inflight[idx] < SHARDS_PER_ACTOR:
                    shard = queue.popleft()
                    pending[actors[idx].__call__.remote(shard)] = (idx, actors[idx], shard)
                    inflight[idx] += 1

        def count_failure(shard: Shard, error: Exception) -> int:
            failures[shard.shard_id] = failures.get(shard.shard_id, 0) + 1
            if failures[shard.shard_id] > cfg.shard_retries:
                log.error("shard %s failed %d times; giving up", shard.shard_id, failures[shard.shard_id])
                raise error
            return failures[shard.shard_id]

        def replace(idx: int, why: str) -> None:
            log.warning("actor %d is dead for good (%s); starting a new one", idx, why)
            ray.kill(actors[idx])
            actors[idx] = new_actor()

        fill()
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            idx, actor, shard = pending.pop(ref)
            if shard is None:  # the probe of a restarting actor: back, or dead for good
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    if actors[idx] is actor:
                        replace(idx, _first_line(e))
                restarting.discard(idx)
                fill()
                continue
            inflight[idx] -= 1
            try:
                summary = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                # A storage outage that outlasted the client's own retries. Shard writes are
                # idempotent and the part is written last, so running the shard again is safe.
                attempt = count_failure(shard, e)
                delay = 2**attempt
                log.warning("shard %s failed (%s); retrying in %ds", shard.shard_id, getattr(e, "cause", e), delay)
                time.sleep(delay)
                queue.appendleft(shard)
                fill()
                continue
            except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError) as e:
                # The actor's process died mid-shard (killed, OOM-killed, crashed, its node lost). The shard goes
                # back to the front of the queue, for any live actor. Ray restarts the actor (ActorUnavailableError);
                # a probe that waits for the restart keeps calls off it until it is back. ActorDiedError: it will
                # not come back (restarts used up, or its __init__ failed), so a new actor takes its slot.
                attempt = count_failure(shard, e)
                log.warning(
                    "shard %s redone (retry %d of %d): its actor %d died (%s: %s)",
                    shard.shard_id,
                    attempt,
                    cfg.shard_retries,
                    idx,
                    type(e).__name__,
                    _first_line(e),
                )
                queue.appendleft(shard)
                if actors[idx] is actor and idx not in restarting:
                    if isinstance(e, ray.exceptions.ActorDiedError):
                        replace(idx, _first_line(e))
                    else:
                        restarting.add(idx)
                        probe = actor.__ray_ready__.options(max_task_retries=-1).remote()
                        pending[probe] = (idx, actor, None)
                fill()
                continue
            if summary.node not in node_ips:
                node_ips.update({n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()})
            log.info(
                "shard %s ran on node %s (%s), actor %d",
                summary.shard_id,
                summary.node,
                node_ips.get(summary.node, "?"),
                idx,
            )
            summaries.append(summary)
            if on_done:
                on_done(summary)
            fill()
        return summaries
    finally:
        for actor in actors:
            ray.kill(actor)
        if connected:
            # Stops a Ray this job started; from a cluster it joined, only disconnects.
            ray.shutdown()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
