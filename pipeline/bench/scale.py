"""The driver at scale: planning from a manifest of millions of URIs, and the reduce over many shard summaries.

- **plan**: ``plan_job`` over a Parquet manifest of ``rows`` image URIs (``input.layout: manifest``), in a fresh
  process: its wall time, and its peak RSS next to the same process before planning (the model's preflight
  imports torch). The plan file streams to a local output; the manifest lists nothing. Then the rerun's plan,
  which reads the committed plan back.
- **reduce**: ``finalize_job`` after ``shards`` shard summaries arrived, as the flow's driver holds them
  (``ShardResults``: light summaries, totals folded as each came): metrics, confusion matrix and a manifest
  naming every shard. Plus the fold alone, and the driver memory the light summaries take.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "weights" / "unet_tiny_shapes.pt"
_CHUNK = 1_000_000  # manifest rows written at a time


def measure(work: Path, rows: int = 10_000_000, shards: int = 100_000, rounds: int = 3) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(work / f"manifest-{rows}.parquet", rows)
    plans, reduces = [], []
    for _ in range(rounds):  # interleaved: this VM's speed drifts
        for out in (work / "plan-out", work / "reduce-out"):
            shutil.rmtree(out, ignore_errors=True)  # a plan left there would be reused, not made
        plans.append(_in_fresh_process("plan", str(manifest), str(work / "plan-out")))
        reduces.append(_in_fresh_process("reduce", str(shards), str(work / "reduce-out")))
    return {"plan": {"rows": rows, "rounds": plans}, "reduce": {"shards": shards, "rounds": reduces}}


def write_manifest(path: Path, rows: int) -> Path:
    """``uri, size, etag`` rows, 1,000 images a folder, on the manifest's own (local) store; kept between runs."""
    if path.exists() and pq.read_metadata(path).num_rows == rows:
        return path
    with pq.ParquetWriter(path, pa.schema([("uri", pa.string()), ("size", pa.int64()), ("etag", pa.string())])) as w:
        for start in range(0, rows, _CHUNK):
            n = np.arange(start, min(rows, start + _CHUNK))
            uris = [f"file:///mnt/imagery/tiles/{i // 1000:06d}/{i:010d}.jpg" for i in n.tolist()]
            etags = [f"{i * 2654435761 % 2**64:016x}{i:016x}" for i in n.tolist()]
            w.write_table(pa.table({"uri": uris, "size": 150_000 + n % 50_000, "etag": etags}))
    return path


def _in_fresh_process(what: str, arg: str, out: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.bench.scale", what, arg, out], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"bench {what} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def plan_once(manifest: str, out: str) -> dict:
    from pipeline.config import JobConfig
    from pipeline.job import plan_job
    from pipeline.preflight import preflight

    cfg = JobConfig(input_uri=manifest, output_uri=out, checkpoint_uri=str(CHECKPOINT), input={"layout": "manifest"})
    preflight(cfg)  # imports and loads what plan_job's own preflight will: the model's share of the RSS
    before = _rss_mb()
    start = time.perf_counter()
    plan = plan_job(cfg)
    seconds = time.perf_counter() - start
    peak = _peak_mb()
    start = time.perf_counter()
    again = plan_job(cfg)  # a rerun of the same job: the committed plan is read back, nothing listed
    if [s.shard_id for s in again.shards] != [s.shard_id for s in plan.shards]:
        raise RuntimeError("the rerun planned other shards")
    return {
        "seconds": round(seconds, 2),
        "rerun_seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mb": round(peak, 1),
        "rss_before_plan_mb": round(before, 1),
        "rss_after_plan_mb": round(_rss_mb(), 1),
        "shards": len(plan.shards),
        "images": plan.info.images,
        "plan_parts": plan.info.parts,
    }


def reduce_once(shards: int, out: str) -> dict:
    """``finalize_job`` over ``shards`` light shards whose summaries all arrived in this process."""
    from pipeline.config import JobConfig
    from pipeline.job import JobPlan, finalize_job
    from pipeline.models.checkpoint import load_checkpoint
    from pipeline.outputs import RowCounts, Totals
    from pipeline.shard import ShardResults, ShardSummary
    from pipeline.sources import Shard

    cfg = JobConfig(input_uri=out, output_uri=out, checkpoint_uri=str(CHECKPOINT))
    _, meta = load_checkpoint(CHECKPOINT.read_bytes(), str(CHECKPOINT))
    c = meta.num_classes
    rng = np.random.default_rng(0)
    pool = [
        Totals(c, RowCounts(64, 1, 63), rng.integers(0, 10**6, (c, c)), rng.integers(0, 10**8, c)) for _ in range(64)
    ]
    light = [Shard(f"{k:07d}-{k * 2654435761 % 16**10:010x}", images=64, plan_part=k // 256) for k in range(shards)]
    plan = JobPlan(cfg, "bench", meta, "0" * 64, light)
    before = _rss_mb()
    start = time.perf_counter()
    results = ShardResults()
    for k, shard in enumerate(light):
        results.add(ShardSummary(shard.shard_id, 64, 1, 63, 1.0, totals=pool[k % len(pool)]))
    fold = time.perf_counter() - start
    held = _rss_mb() - before
    start = time.perf_counter()
    doc = finalize_job(plan, results, 100.0)
    seconds = time.perf_counter() - start
    expected = sum((pool[k % len(pool)].confusion for k in range(shards)), np.zeros((c, c), np.int64))
    if doc["metrics"]["images"] != 64 * shards or not np.array_equal(results.totals.confusion, expected):
        raise RuntimeError("the reduce lost shards")
    return {
        "fold_seconds": round(fold, 3),
        "finalize_seconds": round(seconds, 3),
        "summaries_mb": round(held, 1),
        "bytes_per_shard": round(held * 2**20 / shards),
        "manifest_mb": round(Path(out, "manifest.json").stat().st_size / 2**20, 1),
    }


if __name__ == "__main__":
    kind, arg, out_dir = sys.argv[1:4]
    result = plan_once(arg, out_dir) if kind == "plan" else reduce_once(int(arg), out_dir)
    print(json.dumps(result))
