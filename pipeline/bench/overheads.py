"""Costs that grow with the dataset rather than with pixels: planning (listing and sharding an S3 prefix) and
the reduce of stats parts read back from storage (the parts' rows, as before footers carried totals, and their
footers' totals, as a resumed run reads the parts an earlier attempt committed), each at several sizes on the
local S3 server, with the seconds per 10k and the largest departure from a straight line through the origin."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import InputConfig
from pipeline.devtools.local_s3 import LocalS3
from pipeline.outputs import ImageRow, read_totals, reduce_parts, stats_path, write_stats
from pipeline.sources.layout import InputSource
from pipeline.stats import image_stats

NUM_CLASSES = 21
_UPLOAD_GROUP = 500


def _tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _stats_part(rng: np.random.Generator, rows: int, num_classes: int = NUM_CLASSES) -> list[ImageRow]:
    """A shard's rows as the actors write them: labeled 64x64 images, so every row carries confusion cells."""
    out = []
    for i in range(rows):
        mask = rng.integers(0, num_classes, (64, 64), dtype=np.uint8)
        label = np.where(rng.random((64, 64)) < 0.8, mask, rng.integers(0, num_classes, (64, 64))).astype(np.uint8)
        image_id = f"img_{i}.jpg"
        out.append(
            ImageRow(
                **image_stats(mask, num_classes, label).columns(),
                run_id="bench",
                image_id=image_id,
                source_uri=f"file:///bench/{image_id}",
                shard_id="bench",
                width=64,
                height=64,
                mask_uri=f"file:///bench/masks/{image_id}.png",
                mean_confidence=0.9,
                label_uri=None,
                error=None,
                error_kind=None,
                model="bench",
                increment=1,
                crs=None,
                bounds=None,
            )
        )
    return out


def _fill(fs, objects: dict[str, bytes]) -> None:
    items = list(objects.items())
    for i in range(0, len(items), _UPLOAD_GROUP):
        fs.pipe(dict(items[i : i + _UPLOAD_GROUP]))  # s3fs sends a group's PUTs concurrently


def _line(points: list[dict], key: str) -> dict:
    """Seconds per 10k from a least-squares line through the origin, and how far the points stray from it."""
    n = np.array([p["n"] for p in points], dtype=float)
    s = np.array([p[key] for p in points])
    slope = float(n @ s / (n @ n))
    return {
        "seconds_per_10k": round(slope * 1e4, 3),
        "max_relative_departure": round(float(np.max(np.abs(s - slope * n) / (slope * n))), 3),
    }


def measure(work: Path, sizes: tuple[int, ...] = (2500, 5000, 10000), rows_per_part: int = 16) -> dict:
    """Planning and reduce times at each size (objects resp. stats parts), on a SeaweedFS started here."""
    plan_points, reduce_points = [], []
    rng = np.random.default_rng(0)
    part = _parquet(_stats_part(rng, rows_per_part))
    jpeg = _tiny_jpeg()
    with LocalS3(work / "s3") as s3:
        fs = s3.fs()
        fs.mkdir("bench")
        for n in sizes:
            _fill(fs, {f"bench/plan-{n}/d{i % 100:02d}/img_{i:06d}.jpg": jpeg for i in range(n)})
            _fill(fs, {stats_path(f"bench/reduce-{n}", f"shard-{i:06d}"): part for i in range(n)})
            fresh = s3.fs()  # no listing cache carried over from the uploads
            start = time.perf_counter()
            shards = sum(1 for _ in InputSource(fresh, f"bench/plan-{n}", InputConfig()).plan(256))
            plan_points.append({"n": n, "seconds": round(time.perf_counter() - start, 3), "shards": shards})
            parts = [stats_path(f"bench/reduce-{n}", f"shard-{i:06d}") for i in range(n)]
            start = time.perf_counter()
            mat, counts = reduce_parts(s3.fs(), parts, NUM_CLASSES)
            rows_seconds = round(time.perf_counter() - start, 3)
            start = time.perf_counter()
            totals = read_totals(s3.fs(), parts, NUM_CLASSES)
            footer_seconds = round(time.perf_counter() - start, 3)
            reduce_points.append(
                {"n": n, "seconds": rows_seconds, "footers_seconds": footer_seconds, "images": totals.counts.images}
            )
            if counts.images != n * rows_per_part or mat.sum() != n * rows_per_part * 64 * 64:
                raise RuntimeError(f"the reduce over {n} parts missed rows: {counts}")
            if not np.array_equal(totals.confusion, mat):
                raise RuntimeError(f"the footers' totals over {n} parts differ from the rows'")
    return {
        "planning": {"objects": plan_points, **_line(plan_points, "seconds")},
        "reduce": {"stats_parts": reduce_points, "rows_per_part": rows_per_part, **_line(reduce_points, "seconds")},
        "reduce_footers": _line(reduce_points, "footers_seconds"),
    }


def _parquet(rows: list[dict]) -> bytes:
    """The bytes write_stats would store for these rows."""
    from fsspec.implementations.memory import MemoryFileSystem

    mem = MemoryFileSystem(skip_instance_cache=True)
    write_stats(mem, "/part.parquet", rows, "bench", {}, NUM_CLASSES)
    return mem.cat_file("/part.parquet")
