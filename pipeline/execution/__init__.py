"""Running shards: on a pool of Ray actors, each holding one ShardProcessor (one model resident on its device),
or inline in this process.

- ``resources``: how many actors, and what each reserves from the cluster;
- ``cluster``: joining the cluster named by ``ray_address`` or ``RAY_ADDRESS`` (only disconnecting at the end),
  or else starting a local Ray bound to 127.0.0.1 (stopped at the end); a Ray already initialised is reused;
- ``scheduler``: which shard runs on which actor, retries and actor deaths, as a pure state object;
- ``ray_pool``: ``run_shards``, the Ray loop that carries out the scheduler's decisions;
- ``inline``: ``run_inline``, the same work without Ray.

Ray is imported inside functions only, so the rest of the core runs without it.
"""

from pipeline.execution.inline import run_inline
from pipeline.execution.ray_pool import run_shards
from pipeline.execution.resources import ActorPlan, gpu_share, plan_actors

__all__ = ["ActorPlan", "gpu_share", "plan_actors", "run_inline", "run_shards"]
