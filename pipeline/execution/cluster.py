"""Joining the Ray cluster a job names, or starting a local Ray reachable on 127.0.0.1 only."""

from __future__ import annotations

import logging
import os

from pipeline.config import JobConfig

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def connect(cfg: JobConfig) -> bool:
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
