"""Planning an increment against the size of the result set it adds to, on the local S3 server.

For each size: that many images already committed (written as a real increment would leave them: stats parts
of 64 rows naming their files' ETags, metrics and a manifest, through ``finalize_job``), then 1,000 images
arriving among them. Timed, in interleaved rounds: ``plan_job`` of the increment as a run does it (preflight,
listing, reading the committed parts' footers, planning), the listing alone, and ``plan_job`` when nothing
arrived. The images are tiny: planning never reads them.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import pyarrow as pa

from pipeline.bench.overheads import _fill, _parquet, _stats_part, _tiny_jpeg
from pipeline.config import JobConfig
from pipeline.devtools.local_s3 import LocalS3
from pipeline.job import JobPlan, finalize_job, plan_job
from pipeline.outputs import stats_metadata, stats_path, write_table
from pipeline.outputs.plan import PlanReader
from pipeline.shard import ShardSummary

CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "weights" / "unet_tiny_shapes.pt"
SHARD_SIZE = 64


def measure(work: Path, sizes: tuple[int, ...] = (10_000, 100_000), new: int = 1_000, rounds: int = 3) -> dict:
    """Seconds to plan an increment of ``new`` images over each committed size: min, median and max of
    ``rounds`` rounds, the sizes taken in turn within each round."""
    import numpy as np

    # an increment's shards hold up to twice shard_size images (files.stable_groups)
    template = pa.BufferReader(_parquet(_stats_part(np.random.default_rng(0), 2 * SHARD_SIZE, num_classes=5)))
    shutil.rmtree(work / "s3-increments", ignore_errors=True)  # each measurement starts from empty outputs
    with LocalS3(work / "s3-increments") as s3:
        fs = s3.fs()
        fs.mkdir("bench")
        jobs = {n: _committed(s3, template, n, new) for n in sizes}
        times = {n: {"increment": [], "listing": [], "nothing_new": []} for n in sizes}
        for _ in range(rounds):
            for n, (cfg, settled) in jobs.items():
                times[n]["increment"].append(_timed(lambda c=cfg: plan_job(c)))
                times[n]["listing"].append(_timed(lambda c=cfg: _listing(c)))
                times[n]["nothing_new"].append(_timed(lambda c=settled: plan_job(c)))
    return {
        "new_images": new,
        "shard_size": SHARD_SIZE,
        "rounds": rounds,
        "committed": [{"images": n, **{k: _spread(v) for k, v in times[n].items()}} for n in sizes],
    }


def _committed(s3: LocalS3, template: pa.BufferReader, n: int, new: int) -> tuple[JobConfig, JobConfig]:
    """Upload ``n`` images, commit them as increment 1 (parts written here, not by a model), then upload ``new``
    more spread among them. Returns the job planning those, and one over an output where nothing is new."""
    import pyarrow.parquet as pq

    fs, root = s3.fs(), f"bench/increments-{n}"
    names = [f"cam{i % 10}/{i:07d}.jpg" for i in range(n + new)]
    arriving = set(names[:: (n + new) // new][:new])
    jpeg = _tiny_jpeg()
    _fill(fs, {f"{root}/images/{name}": jpeg for name in names if name not in arriving})
    rows = pq.read_table(template)
    outputs = {}
    for out in ("out", "settled"):
        cfg = JobConfig(
            input_uri=f"s3://{root}/images",
            output_uri=f"s3://{root}/{out}",
            checkpoint_uri=str(CHECKPOINT),
            mode="incremental",
            shard_size=SHARD_SIZE,
            storage=s3.storage_config(),
            outputs={"report": False},
        )
        _commit(fs, plan_job(cfg), rows)
        outputs[out] = cfg
    _fill(fs, {f"{root}/images/{name}": jpeg for name in arriving})
    found = plan_job(outputs["out"]).increment.new_files
    if found != new:
        raise RuntimeError(f"the increment over {n} images found {found} new ones, not {new}")
    # "settled" also gets the new images committed, so that its next plan finds nothing new.
    _commit(fs, plan_job(outputs["settled"]), rows)
    return outputs["out"], outputs["settled"]


def _commit(fs, plan: JobPlan, rows: pa.Table) -> None:
    """Commit ``plan`` with each shard's stats part written as an actor would leave it (its images' rows and
    its files' versions), without a model."""
    _, out = plan.cfg.resolve(plan.cfg.output_uri)
    members = PlanReader(fs, out)
    for shard in map(members.full, plan.shards):
        table = rows.slice(0, len(shard.items))
        table = table.set_column(table.schema.get_field_index("image_id"), "image_id", pa.array(shard.items))
        metadata = stats_metadata(plan.run_id, shard.sources())
        write_table(fs, stats_path(out, shard.shard_id), table.replace_schema_metadata(metadata))
    finalize_job(plan, [ShardSummary(s.shard_id, s.images, 0, 0, 0.0) for s in plan.shards], 1.0)


def _listing(cfg: JobConfig) -> int:
    from pipeline.sources.layout import InputSource

    fs, root = cfg.resolve(cfg.input_uri)
    fs.invalidate_cache()
    return len(InputSource(fs, root, cfg.input).list_inputs())


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _spread(seconds: list[float]) -> dict:
    return {k: round(f(seconds), 2) for k, f in (("min", min), ("median", statistics.median), ("max", max))}
