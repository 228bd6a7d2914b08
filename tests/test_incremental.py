"""Incremental runs: a growing input folder, one output, each new or changed image segmented once.

The end-to-end tests run real jobs (local Ray, Prefect ephemeral) over generated images, change the folder as
cameras and labelling tools do (add, overwrite, delete), and compare the output with a full run over the
final folder; one kills an increment with SIGKILL mid-way."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import duckdb
import fsspec
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError, InputError
from pipeline.incremental import Committed, find_changes, plan_changes
from pipeline.palette import mask_to_png
from pipeline.sources import InputFile, content_version
from pipeline.sources.files import list_inputs, plan_increment, stable_groups
from pipeline.synthetic import generate_sample, make_dataset

LOCAL = fsspec.filesystem("file")


def files(n: int, version: str = "v1") -> list[InputFile]:
    return [InputFile(f"{i // 50:02d}/img_{i:05d}.jpg", 100, version) for i in range(n)]


# --- planning, pure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 4, 64])
def test_stable_groups_cover_every_file_in_order_and_never_exceed_twice_the_size(size):
    listing = files(500)
    groups = stable_groups(listing, size)
    assert [f for g in groups for f in g] == listing
    assert all(0 < len(g) <= 2 * size for g in groups)


def test_a_resumed_increment_plans_its_remaining_shards_with_the_same_ids():
    """A rerun skips whole committed shards; the others must be cut and named exactly as before."""
    first = plan_increment(files(400), 8, increment=3)
    assert len(first) > 20 and all(s.increment == 3 for s in first)
    committed = {s.shard_id for s in first[::3]}
    remaining = [f for f in files(400) if not any(f.path in s.items for s in first[::3])]
    again = plan_increment(remaining, 8, increment=3)
    assert again == [s for s in first if s.shard_id not in committed]


def test_a_file_arriving_meanwhile_changes_only_the_shard_it_falls_into():
    before = plan_increment(files(400), 8, increment=2)
    grown = sorted([*files(400), InputFile("03/img_00160b.jpg", 5, "v1")], key=lambda f: f.path)
    after = plan_increment(grown, 8, increment=2)
    changed = {s.shard_id for s in before} ^ {s.shard_id for s in after}
    assert 1 <= len(changed) <= 4  # the shard it joins (and, if it is a cut itself, that shard split in two)


def test_shard_ids_name_the_versions_and_the_increment():
    [a] = plan_increment(files(1), 8, increment=2)
    [b] = plan_increment(files(1, "v2"), 8, increment=2)
    [c] = plan_increment(files(1), 8, increment=3)
    assert len({a.shard_id, b.shard_id, c.shard_id}) == 3
    assert a.shard_id.startswith("i0002-") and c.shard_id.startswith("i0003-")
    assert a.sources() == {"00/img_00000.jpg": "v1"}


def test_changes_are_new_changed_and_deleted_files():
    committed = {"a.jpg": "v1", "b.jpg": "v1", "c.jpg": "v1"}
    listing = [InputFile("a.jpg", 1, "v1"), InputFile("b.jpg", 1, "v2"), InputFile("d.jpg", 1, "v1")]
    changes = find_changes(listing, committed)
    assert [f.path for f in changes.new] == ["d.jpg"]
    assert [f.path for f in changes.changed] == ["b.jpg"]
    assert changes.deleted == ["c.jpg"]
    assert [f.path for f in changes.todo] == ["b.jpg", "d.jpg"]


@pytest.mark.parametrize(("prune", "replaced"), [(False, ["p1"]), (True, ["p1", "p2"])])
def test_parts_holding_rows_that_leave_are_replaced_the_others_kept(prune, replaced):
    committed = Committed(
        versions={"a": "v1", "b": "v1", "c": "v1", "d": "v1"},
        files={"p1": frozenset({"a", "b"}), "p2": frozenset({"c"}), "p3": frozenset({"d"})},
        rows={"p1": 2, "p2": 1, "p3": 1},
    )
    listing = [InputFile("a", 1, "v1"), InputFile("b", 1, "v2"), InputFile("d", 1, "v1")]
    plan = plan_changes(4, [], committed, find_changes(listing, committed.versions), prune)
    assert plan.replaced == replaced
    assert set(plan.kept) == {"p1", "p2", "p3"} - set(replaced)
    assert (plan.changed_files, plan.deleted_files, plan.pruned_files) == (1, 1, int(prune))


def test_a_version_is_the_etag_when_the_store_gives_one_else_size_and_mtime(tmp_path):
    assert content_version({"ETag": '"9b2cf535f27731c974343645a3985328"', "size": 3}) == (
        "etag:9b2cf535f27731c974343645a3985328"
    )
    image = tmp_path / "a.jpg"
    image.write_bytes(b"one")
    [first] = list_inputs(LOCAL, str(tmp_path))
    assert first.version.startswith("size+mtime:3:")
    time.sleep(0.01)
    image.write_bytes(b"two")  # same size, new content: the modification time tells
    [second] = list_inputs(LOCAL, str(tmp_path))
    assert second.version != first.version


# --- end to end --------------------------------------------------------------------------------------------


def add_images(data: Path, count: int, seed: int, prefix: str) -> list[str]:
    """Write ``count`` new labeled images under images/<prefix>/; returns their ids."""
    ids = []
    for i in range(count):
        img, label = generate_sample(seed, i)
        rel = f"{prefix}/new_{i:03d}"
        (data / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / "labels" / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(data / "images" / f"{rel}.jpg", format="JPEG", quality=92)
        (data / "labels" / f"{rel}.png").write_bytes(mask_to_png(label))
        ids.append(f"{rel}.jpg")
    return ids


def change_images(data: Path, ids: list[str], seed: int) -> None:
    """Overwrite each image (and its label) with another picture, as a relabelled or re-shot file."""
    for n, image_id in enumerate(ids):
        img, label = generate_sample(seed, n)
        path = data / "images" / image_id
        buf = io.BytesIO()
        img.save(buf, format="JPEG" if path.suffix == ".jpg" else "PNG")
        path.write_bytes(buf.getvalue())
        (data / "labels" / image_id).with_suffix(".png").write_bytes(mask_to_png(label))


def image_ids(data: Path) -> list[str]:
    return sorted(str(p.relative_to(data / "images")) for p in (data / "images").rglob("*") if p.is_file())


def stats(out: Path):
    return pq.read_table(sorted((out / "stats").glob("part-*.parquet"))).sort_by("image_id")


def comparable(out: Path) -> list[dict]:
    """The rows as a full run would have them: where they lie, which shard and increment wrote them aside."""
    return stats(out).drop(["mask_uri", "shard_id", "increment"]).to_pylist()


def run(data: Path, out: Path, checkpoint: Path, **fields) -> dict:
    from flows.segment_dataset import segment_dataset

    fields = {"shard_size": 8, "actors": 1, "outputs": {"report": False}} | fields
    return segment_dataset(
        input_uri=str(data / "images"),
        labels_uri=str(data / "labels"),
        output_uri=str(out),
        checkpoint_uri=str(checkpoint),
        **fields,
    )


@pytest.mark.slow
def test_an_increment_segments_only_what_changed_and_equals_a_full_run(
    tmp_path, checkpoint, ray_local, prefect_ephemeral
):
    data = make_dataset(tmp_path / "ds", 40, seed=7)
    out = tmp_path / "out"
    run(data, out, checkpoint)  # a full run first, as a new user would start

    added = add_images(data, 30, seed=31, prefix="001")
    changed = image_ids(data)[:5]
    change_images(data, changed, seed=99)
    deleted = image_ids(data)[10:13]
    for image_id in deleted:
        (data / "images" / image_id).unlink()
    result = run(data, out, checkpoint, mode="incremental", prune_deleted=True, outputs={"report": True})

    manifest = result["manifest"]
    latest = manifest["increments"][-1]
    assert len(manifest["increments"]) == 2 and latest["number"] == 2
    assert latest["processed"] == 35 and latest["errors"] == 0
    assert (latest["new_files"], latest["changed_files"], latest["deleted_files"], latest["pruned_files"]) == (
        30,
        5,
        3,
        3,
    )
    assert latest["images"] == manifest["counts"]["images"] == 67
    assert {r["image_id"] for r in stats(out).filter(pq_in("shard_id", latest["parts"])).to_pylist()} == {
        *added,
        *changed,
    }

    # Each current image once, in what a bare listing of stats/ shows and in the parts the manifest names.
    rows = stats(out)
    assert rows["image_id"].to_pylist() == image_ids(data)
    listed = sorted(p.name for p in (out / "stats").glob("part-*.parquet"))
    assert listed == sorted(f"part-{s['shard_id']}.parquet" for s in manifest["shards"])
    parts = [str(out / "stats" / f"part-{s['shard_id']}.parquet") for s in manifest["shards"]]
    assert duckdb.sql(f"SELECT count(*), count(DISTINCT image_id) FROM read_parquet({parts})").fetchall() == [(67, 67)]
    for image_id in deleted:
        assert not (out / "masks" / f"{image_id}.png").exists()

    full = tmp_path / "full"
    reference = run(data, full, checkpoint)
    assert json.loads((out / "metrics.json").read_text()) == json.loads((full / "metrics.json").read_text())
    assert comparable(out) == comparable(full)
    for image_id in changed + added[:3]:
        assert (out / "masks" / f"{image_id}.png").read_bytes() == (full / "masks" / f"{image_id}.png").read_bytes()
    assert manifest["run_id"] == reference["manifest"]["run_id"]
    report = (out / "report.html").read_text()
    assert "<td>increment</td><td>2: 35 images segmented (30 new, 5 changed, 3 deleted files, 3 pruned)" in report

    # Nothing new: an empty increment that writes no part and changes no number.
    again = run(data, out, checkpoint, mode="incremental", prune_deleted=True)
    assert again["manifest"]["increments"][-1]["processed"] == 0
    assert again["manifest"]["counts"] == manifest["counts"] | {"shards_skipped": len(manifest["shards"])}
    assert again["metrics"] == result["metrics"]

    # A full run would redo the set from another listing: refused, pointing at incremental mode.
    with pytest.raises(InputError, match="holds an incremental result set .* run with mode: incremental"):
        run(data, out, checkpoint)


def pq_in(column: str, values: list[str]):
    import pyarrow.compute as pc

    return pc.field(column).isin(values)


def run_in_process(cfg) -> dict:
    """A whole job without Ray or Prefect: plan, every pending shard on one processor, finalize."""
    from pipeline.job import finalize_job, plan_job
    from pipeline.shard import ShardProcessor

    plan = plan_job(cfg)
    processor = ShardProcessor(plan.cfg, plan.run_id, torch_threads=1)
    return finalize_job(plan, [processor(shard) for shard in plan.pending], 1.0)


def test_another_model_into_the_same_output_is_refused_naming_what_differs(tmp_path, checkpoint, dataset):
    from pipeline.config import JobConfig
    from pipeline.job import plan_job
    from pipeline.models.checkpoint import load_checkpoint, save_checkpoint

    job = dict(input_uri=str(dataset / "images"), output_uri=str(tmp_path / "out"), mode="incremental")
    job |= {"shard_size": 8, "outputs": {"report": False}}
    done = run_in_process(JobConfig(checkpoint_uri=str(checkpoint), **job))
    assert done["manifest"]["increments"][-1]["processed"] == 24

    other = tmp_path / "same-weights-other-file.safetensors"
    other.write_bytes(save_checkpoint(*load_checkpoint(checkpoint.read_bytes(), str(checkpoint)), format="safetensors"))
    with pytest.raises(InputError, match=r"another job .*differ in checkpoint_sha256\); choose a new output"):
        plan_job(JobConfig(checkpoint_uri=str(other), **job))
    with pytest.raises(InputError, match=r"differ in inference\); choose a new output"):
        plan_job(JobConfig(checkpoint_uri=str(checkpoint), inference={"mode": "slide", "tile": [96, 96]}, **job))
    assert plan_job(JobConfig(checkpoint_uri=str(checkpoint), **job)).shards == []  # the same job: nothing to do


def test_prune_deleted_is_for_incremental_runs_only(tmp_path, checkpoint):
    from pipeline.config import JobConfig

    with pytest.raises(ValueError, match="prune_deleted: applies to mode: incremental only"):
        JobConfig(input_uri="a", output_uri="b", checkpoint_uri=str(checkpoint), prune_deleted=True)


def test_a_layout_that_lists_no_versions_cannot_run_incrementally(tmp_path, checkpoint, dataset):
    from pipeline.config import JobConfig
    from pipeline.sources.base import Layout

    class Unversioned(Layout):
        def plan(self, fs, root, cfg, shard_size):
            return []

        def read(self, fs, root, shard, cfg, pool):
            return iter(())

    from pipeline.job import _plan_increment
    from pipeline.sources.layout import InputSource

    cfg = JobConfig(input_uri=str(dataset / "images"), output_uri=str(tmp_path), checkpoint_uri=str(checkpoint))
    source = InputSource(LOCAL, str(dataset / "images"), cfg.input)
    source._impl, source.layout = Unversioned(), "unversioned"
    with pytest.raises(ConfigError, match="mode: the unversioned layout cannot run incrementally"):
        _plan_increment(cfg, source, None, LOCAL, str(tmp_path))


@pytest.mark.slow
def test_a_killed_increment_reruns_to_what_an_uninterrupted_one_writes(
    tmp_path, checkpoint, ray_local, prefect_ephemeral, kill_run_once
):
    data = make_dataset(tmp_path / "ds", 16, seed=5)
    base = tmp_path / "base"
    run(data, base, checkpoint, mode="incremental")
    add_images(data, 48, seed=13, prefix="002")
    change_images(data, image_ids(data)[:2], seed=17)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    shutil.copytree(base, killed)
    shutil.copytree(base, clean)

    kill_run_once(
        ["--input", str(data / "images"), "--output", str(killed), "--labels", str(data / "labels"),
         "--checkpoint", str(checkpoint), "--shard-size", "8", "--actors", "1", "--mode", "incremental",
         "--outputs.report", "false"],
        killed / "stats", "part-i0002-*.parquet",
    )  # fmt: skip

    manifest = json.loads((killed / "manifest.json").read_text())
    assert len(manifest["increments"]) == 1  # the killed increment does not look finished
    assert 0 < len(list((killed / "stats").glob("part-i0002-*.parquet"))) < 6

    resumed = run(data, killed, checkpoint, mode="incremental")
    reference = run(data, clean, checkpoint, mode="incremental")
    assert resumed["manifest"]["counts"]["shards_skipped"] > reference["manifest"]["counts"]["shards_skipped"]
    assert stats(killed).drop(["mask_uri"]).to_pylist() == stats(clean).drop(["mask_uri"]).to_pylist()
    assert resumed["metrics"] == reference["metrics"]
    timeless = {"started_at", "finished_at"}
    assert [{k: v for k, v in i.items() if k not in timeless} for i in resumed["manifest"]["increments"]] == [
        {k: v for k, v in i.items() if k not in timeless} for i in reference["manifest"]["increments"]
    ]
    assert sorted(p.name for p in (killed / "stats").iterdir()) == sorted(p.name for p in (clean / "stats").iterdir())
    assert resumed["manifest"]["increments"][-1]["processed"] == 50


def write_tar(path: Path, dataset: Path, ids: list[str]) -> None:
    """A tar shard of the dataset's images ``ids``, each with its label as ``<key>.seg.png``."""
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for image_id in ids:
            key = image_id.rsplit(".", 1)[0].replace("/", "_")
            for name, src in ((f"{key}.{image_id.rsplit('.', 1)[1]}", dataset / "images" / image_id),
                              (f"{key}.seg.png", (dataset / "labels" / image_id).with_suffix(".png"))):  # fmt: skip
                tar.add(src, arcname=name)


def test_tar_shards_are_increments_of_whole_files(tmp_path, checkpoint, dataset):
    """A changed tar is segmented again whole and its old part dropped; a new tar is added; a deleted one pruned."""
    from pipeline.config import JobConfig

    ids = image_ids(dataset)
    tars = tmp_path / "tars"
    for n in range(3):
        write_tar(tars / f"train-{n}.tar", dataset, ids[8 * n : 8 * n + 8])
    job = dict(input_uri=str(tars), checkpoint_uri=str(checkpoint), outputs={"report": False})
    incremental = dict(job, output_uri=str(tmp_path / "out"), mode="incremental", prune_deleted=True)
    first = run_in_process(JobConfig(**incremental))
    assert first["manifest"]["increments"][-1]["processed"] == 24

    time.sleep(0.01)
    write_tar(tars / "train-1.tar", dataset, ids[8:14])  # rewritten with fewer samples
    (tars / "train-2.tar").unlink()
    write_tar(tars / "train-3.tar", dataset, ids[16:20])
    second = run_in_process(JobConfig(**incremental))
    latest = second["manifest"]["increments"][-1]
    assert (latest["processed"], latest["new_files"], latest["changed_files"], latest["pruned_files"]) == (10, 1, 1, 1)
    assert len(latest["replaced"]) == 2 and latest["rewritten"] == []  # whole files: nothing to keep of them
    full = run_in_process(JobConfig(**job, output_uri=str(tmp_path / "full")))
    assert second["metrics"] | {"run_id": ""} == full["metrics"] | {"run_id": ""}
    assert comparable(tmp_path / "out") == comparable(tmp_path / "full")
    assert not list((tmp_path / "out" / "masks" / "train-2").rglob("*.png"))
    assert len(list((tmp_path / "out" / "masks").rglob("*.png"))) == 18
