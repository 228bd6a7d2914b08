"""How long a planned job would take: its model timed on the input's first images, on this machine.

``segpipe plan --estimate`` loads the job's model with the job's settings (device, precision, batch, inference
mode), decodes the first images of the input and predicts them over and over for a few seconds. The rate, times
the actors a run here would start, gives the estimate. It times the model only: fetching, decoding, PNG encoding
and writes add about a fifth on a CPU (BENCHMARKS.md, "Feeding a GPU"), and a cluster runs more actors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import islice

from pipeline.execution.resources import plan_actors
from pipeline.job import JobPlan
from pipeline.shard import ShardProcessor
from pipeline.sources.layout import InputSource

SAMPLE_IMAGES = 8


@dataclass(frozen=True)
class Estimate:
    images_per_second: float  # of one actor
    actors: int
    seconds: float | None  # for the plan's pending images; None when their count is not known (tars)


def estimate(plan: JobPlan, seconds: float = 5.0) -> Estimate:
    """Time the model on the first ``SAMPLE_IMAGES`` images for about ``seconds``; the estimate for the rest."""
    cfg = plan.cfg
    resources = {"CPU": float(os.cpu_count() or 1), "GPU": float(_gpus())}
    actors = plan_actors(cfg, resources, max(1, len(plan.pending)))
    processor = ShardProcessor(cfg, plan.run_id, torch_threads=actors.torch_threads)
    source = InputSource(*cfg.resolve(cfg.input_uri), cfg.input)
    first = next(iter(source.plan(cfg.shard_size)))
    rate = processor.model_rate(islice(source.read(first, processor.pool), SAMPLE_IMAGES), seconds)
    counts = [s.images for s in plan.pending]
    pending = None if None in counts else sum(counts)
    total = pending / (rate * actors.actors) if pending is not None and rate else None
    return Estimate(round(rate, 3), actors.actors, round(total, 1) if total is not None else None)


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def elapsed(seconds: float) -> str:
    """``3 h 25 min``, ``12 min 5 s``, ``40 s``."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    if h:
        return f"{h} h {m} min"
    return f"{m} min {s % 60} s" if m else f"{s} s"
