"""Resume: a run killed mid-way (SIGKILL to its whole process group) and rerun equals an uninterrupted run.
The images go through sliding windows (96 px tiles for 128-192 px images): whole images are what every other
end-to-end test runs, and resuming must not depend on how an image is cut."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipeline.synthetic import make_dataset

pytestmark = pytest.mark.slow


def stats_rows(out):
    table = pq.read_table(sorted((out / "stats").glob("part-*.parquet"))).sort_by("image_id")
    return table.drop(["mask_uri"]).to_pylist()  # mask_uri names the output folder itself


def test_killed_run_resumes_to_the_same_rows(tmp_path, checkpoint, ray_local, prefect_ephemeral, kill_run_once):
    from flows.segment_dataset import segment_dataset

    data = make_dataset(tmp_path / "ds", 64, seed=11)
    common = dict(labels_uri=str(data / "labels"), checkpoint_uri=str(checkpoint), shard_size=4, actors=1)
    common["inference"] = {"mode": "slide", "tile": [96, 96]}
    common["outputs"] = {"report": False}  # the rows are compared here; reports have their own tests
    out = tmp_path / "killed"
    kill_run_once(
        ["--input", str(data / "images"), "--output", str(out), "--labels", common["labels_uri"],
         "--checkpoint", common["checkpoint_uri"], "--shard-size", "4", "--actors", "1",
         "--inference.mode", "slide", "--inference.tile", "[96, 96]"],
        out / "stats", "part-*.parquet",
    )  # fmt: skip

    committed = list((out / "stats").glob("part-*.parquet"))
    assert 0 < len(committed) < 16
    assert not (out / "manifest.json").exists() and not (out / "metrics.json").exists()
    for part in committed:  # every part a reader can see is whole
        assert pq.read_table(part).num_rows == 4

    resumed = segment_dataset(input_uri=str(data / "images"), output_uri=str(out), **common)
    assert resumed["manifest"]["counts"]["shards_skipped"] >= len(committed)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]

    clean = tmp_path / "clean"
    reference = segment_dataset(input_uri=str(data / "images"), output_uri=str(clean), **common)
    assert stats_rows(out) == stats_rows(clean)
    assert len(stats_rows(out)) == 64
    assert json.loads((out / "metrics.json").read_text()) == json.loads((clean / "metrics.json").read_text())
    assert resumed["manifest"]["run_id"] == reference["manifest"]["run_id"]
