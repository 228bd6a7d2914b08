"""How many actors a job runs, and what each reserves from the cluster (plain arithmetic, no Ray)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import JobConfig


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
