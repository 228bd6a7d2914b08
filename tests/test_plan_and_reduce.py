"""The plan file and the reduce over shard totals: a driver whose memory and reduce grow per shard, not per image.

- the plan streams into ``plan/part-*.parquet``; the driver keeps light shards, the actors read their members
  back, a rerun of the same job reuses a committed plan, and a dry run writes nothing;
- each stats part carries its rows' totals, and the metrics summed from them equal the metrics the rows
  themselves reduce to (the reduce before totals existed), for a run in one go and for one resumed.
"""

from __future__ import annotations

import gc
import json
import shutil
import tracemalloc

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.execution import run_inline
from pipeline.execution.progress import Progress
from pipeline.job import finalize_job, plan_job
from pipeline.metrics import metrics_report
from pipeline.outputs import Totals, reduce_confusion, reduce_parts
from pipeline.outputs.plan import PLAN_DIR, SHARDS_PER_PART, PlanReader, commit_plan, read_plan, write_plan
from pipeline.outputs.rows import CONFUSION_CELLS
from pipeline.shard import ShardSummary
from pipeline.sources import Shard, shard_id_for

LOCAL = fsspec.filesystem("file")


def shards(n: int, per_shard: int) -> list[Shard]:
    """``n`` full shards of ``per_shard`` loose files each, with sizes and versions, as a listing gives them."""
    out = []
    for k in range(n):
        items = tuple(f"d{k // 100:03d}/img-{k:06d}-{i:03d}.jpg" for i in range(per_shard))
        versions = tuple(f"etag:{k}-{i}" for i in range(per_shard))
        sizes = tuple(1000 + i for i in range(per_shard))
        out.append(Shard(shard_id_for(k, *items), items=items, images=per_shard, versions=versions, sizes=sizes))
    return out


def test_plan_round_trip_light_shards_and_counts(tmp_path):
    full = shards(2 * SHARDS_PER_PART + 3, 4)
    light, info = write_plan(LOCAL, str(tmp_path), iter(full), "run1", 1)
    assert read_plan(LOCAL, str(tmp_path), "run1", 1) is None  # not committed yet
    commit_plan(LOCAL, str(tmp_path), info)
    assert [s.shard_id for s in light] == [s.shard_id for s in full]
    assert all(s.items == () and s.versions == () and s.plan_part is not None for s in light)
    assert (info.shards, info.images, info.files, info.parts) == (len(full), 4 * len(full), 4 * len(full), 3)
    assert info.bytes == sum(sum(s.sizes) for s in full)
    reader = PlanReader(LOCAL, str(tmp_path))
    assert [reader.full(s) for s in light] == full
    assert json.loads((tmp_path / PLAN_DIR / "plan.json").read_text())["run_id"] == "run1"
    again, again_info = read_plan(LOCAL, str(tmp_path), "run1", 1)
    assert again == light and again_info == info
    assert read_plan(LOCAL, str(tmp_path), "another-run", 1) is None
    assert read_plan(LOCAL, str(tmp_path), "run1", 2) is None


def test_members_files_are_counted_once_per_file(tmp_path):
    parquet = [
        Shard("a", member="x.parquet", row_groups=(0, 2), images=10, sizes=(500,)),
        Shard("b", member="x.parquet", row_groups=(2, 3), images=5, sizes=(500,)),
        Shard("c", member="y.parquet", row_groups=(0, 1), images=7, sizes=(300,)),
    ]
    _, info = write_plan(LOCAL, str(tmp_path / "p"), parquet, "run", 1)
    commit_plan(LOCAL, str(tmp_path / "p"), info)
    assert (info.files, info.images, info.bytes) == (2, 22, 800)
    tars = [Shard("t", member="a.tar", sizes=(100,)), Shard("u", member="b.tar")]  # unknown count and size
    _, info = write_plan(LOCAL, str(tmp_path / "t"), tars, "run", 1)
    assert (info.files, info.images, info.bytes) == (2, None, None)
    assert PlanReader(LOCAL, str(tmp_path / "p")).full(_light_of(tmp_path / "p", "b")) == parquet[1]


def _light_of(root, shard_id: str) -> Shard:
    light, _ = read_plan(LOCAL, str(root), "run", 1)
    return next(s for s in light if s.shard_id == shard_id)


def test_a_new_plan_replaces_the_old_one_its_commit_first(tmp_path):
    _, info = write_plan(LOCAL, str(tmp_path), shards(3 * SHARDS_PER_PART, 1), "run", 1)
    commit_plan(LOCAL, str(tmp_path), info)
    write_plan(LOCAL, str(tmp_path), shards(1, 2), "run", 1)  # every earlier part goes, plan.json first
    assert sorted(p.name for p in (tmp_path / PLAN_DIR).iterdir()) == ["part-00000.parquet"]
    assert read_plan(LOCAL, str(tmp_path), "run", 1) is None


def test_the_driver_keeps_a_few_hundred_bytes_per_shard_whatever_its_images(tmp_path):
    """Light shards cost the same for 8 or 200 images a shard; the stream holds one part at a time."""
    retained = {}
    for per_shard in (8, 200):
        stream = shards(3 * SHARDS_PER_PART, per_shard)
        gc.collect()
        tracemalloc.start()
        light, _ = write_plan(LOCAL, str(tmp_path / str(per_shard)), iter(stream), "run", 1)
        gc.collect()
        retained[per_shard] = tracemalloc.get_traced_memory()[0] / len(light)
        tracemalloc.stop()
        del light
    assert retained[200] < 400, retained
    assert retained[200] < 1.5 * retained[8], retained


def test_progress_reports_once_an_interval_and_the_last_shard():
    progress = Progress(shards=1000, start=0.0, interval=1.0)
    summary = ShardSummary("s", images=4, errors=1, labeled=0, seconds=0.1)
    lines = [progress.add(summary, now=k * 0.01) for k in range(1000)]  # 1,000 shards in 10 s
    said = [line for line in lines if line is not None]
    assert 10 <= len(said) <= 12
    assert lines[-1] is not None and lines[-1].startswith("1000/1000 shards committed (100.0 %), 4000 images, 1000")
    assert progress.percent == 100.0


# --- against a real job ---------------------------------------------------------------------------------------


def job(dataset, out, **fields) -> JobConfig:
    return JobConfig(
        input_uri=str(dataset / "images"),
        labels_uri=str(dataset / "labels"),
        output_uri=str(out),
        checkpoint_uri=fields.pop("checkpoint"),
        shard_size=3,
        batch_size=4,
        **fields,
    )


def rows_reduce(out, num_classes: int) -> dict:
    """The metrics of the run's rows themselves: every stats part's confusion cells summed (the old reduce)."""
    fs, paths = LOCAL, sorted(str(p) for p in (out / "stats").glob("part-*.parquet"))
    mat, counts = reduce_parts(fs, paths, num_classes)
    return {"images": counts.images, "errors": counts.errors, "labeled": counts.labeled, "matrix": mat.tolist()}


def test_metrics_from_totals_equal_the_rows_reduce_in_one_go_and_resumed(tmp_path, dataset, checkpoint):
    whole = job(dataset, tmp_path / "whole", checkpoint=str(checkpoint))
    plan = plan_job(whole)
    assert (tmp_path / "whole" / PLAN_DIR / "plan.json").exists()
    assert all(s.items == () and s.plan_part is not None for s in plan.shards)  # the driver's shards are light
    one_go = finalize_job(plan, run_inline(plan.cfg, plan.run_id, plan.pending), 1.0)["metrics"]

    resumed_cfg = job(dataset, tmp_path / "resumed", checkpoint=str(checkpoint))
    first = plan_job(resumed_cfg)
    run_inline(first.cfg, first.run_id, first.pending[:2])  # an attempt that committed two shards, then died
    second = plan_job(resumed_cfg)  # reuses the plan: same shards, two committed
    assert [s.shard_id for s in second.shards] == [s.shard_id for s in first.shards]
    assert len(second.committed) == 2
    resumed = finalize_job(second, run_inline(second.cfg, second.run_id, second.pending), 1.0)["metrics"]

    expected = rows_reduce(tmp_path / "whole", plan.meta.num_classes)
    assert expected == rows_reduce(tmp_path / "resumed", plan.meta.num_classes)
    for metrics in (one_go, resumed):
        assert (metrics["images"], metrics["errors"], metrics["labeled_images"]) == (
            expected["images"],
            expected["errors"],
            expected["labeled"],
        )
        report = metrics_report(np.asarray(expected["matrix"], np.int64), list(plan.meta.class_names))
        assert json.dumps({k: metrics[k] for k in report}, sort_keys=True) == json.dumps(report, sort_keys=True)


def test_each_part_footer_carries_its_rows_totals(tmp_path, dataset, checkpoint):
    cfg = job(dataset, tmp_path / "out", checkpoint=str(checkpoint))
    plan = plan_job(cfg)
    summaries = run_inline(plan.cfg, plan.run_id, plan.pending)
    assert all(s.totals is None for s in summaries) and summaries.totals is not None  # folded as they came
    parts = sorted((tmp_path / "out" / "stats").glob("part-*.parquet"))
    classes = plan.meta.num_classes
    folded = Totals(classes)
    for path in parts:
        table = pq.read_table(path)
        footer = Totals.from_metadata(table.schema.metadata, classes)
        mat, counts = reduce_confusion([table], classes)
        assert np.array_equal(footer.confusion, mat) and footer.counts == counts
        pixels = np.array([p for p in table["class_pixels"].to_pylist() if p is not None], np.int64).sum(axis=0)
        assert np.array_equal(footer.class_pixels, pixels)
        folded += footer
    assert np.array_equal(folded.confusion, summaries.totals.confusion)
    assert np.array_equal(folded.class_pixels, summaries.totals.class_pixels)
    assert folded.counts == summaries.totals.counts


def test_a_part_without_totals_is_reduced_from_its_rows(tmp_path, dataset, checkpoint):
    """Parts written before footers carried totals still reduce exactly."""
    cfg = job(dataset, tmp_path / "out", checkpoint=str(checkpoint))
    plan = plan_job(cfg)
    run_inline(plan.cfg, plan.run_id, plan.pending)
    expected = rows_reduce(tmp_path / "out", plan.meta.num_classes)
    for path in (tmp_path / "out" / "stats").glob("part-*.parquet"):
        table = pq.read_table(path)
        meta = {k: v for k, v in table.schema.metadata.items() if k != b"segpipe.totals"}
        pq.write_table(table.replace_schema_metadata(meta), path)
    light = [ShardSummary(s.shard_id, s.images or 0, 0, 0, 0.0) for s in plan.shards]  # no totals brought
    metrics = finalize_job(plan, light, 1.0)["metrics"]
    assert metrics["images"] == expected["images"]
    report = metrics_report(np.asarray(expected["matrix"], np.int64), list(plan.meta.class_names))
    assert json.dumps({k: metrics[k] for k in report}, sort_keys=True) == json.dumps(report, sort_keys=True)
    written = pq.read_table(tmp_path / "out" / "confusion_matrix.parquet").drop(["ground_truth"])
    assert np.array(written.to_pydict()[written.column_names[0]]).tolist() == [r[0] for r in expected["matrix"]]


def test_a_rerun_reuses_the_plan_and_a_dry_run_writes_nothing(tmp_path, dataset, checkpoint):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    cfg = job(data, tmp_path / "out", checkpoint=str(checkpoint))
    dry = plan_job(cfg, dry_run=True)
    assert not (tmp_path / "out").exists()
    first = plan_job(cfg)
    assert [s.shard_id for s in first.shards] == [s.shard_id for s in dry.shards]
    assert first.info == dry.info
    extra = sorted((data / "images").rglob("*.jpg"))[0]
    shutil.copy(extra, data / "images" / f"zz-late-{extra.name}")  # arrives after the plan was made
    again = plan_job(cfg)
    assert [s.shard_id for s in again.shards] == [s.shard_id for s in first.shards]  # the plan, not a new listing
    assert again.info.images == first.info.images


def test_reduce_of_many_totals_is_exact(tmp_path):
    """Totals folded in any order and grouping give the same int64 sums as the rows' sparse cells."""
    rng = np.random.default_rng(0)
    tables = []
    for _ in range(40):
        cells = [
            [
                {"gt": int(g), "pred": int(p), "count": int(rng.integers(1, 10**12))}
                for g, p in rng.integers(0, 5, (3, 2))
            ]
            for _ in range(5)
        ]
        tables.append(
            pa.table(
                {
                    "confusion": pa.array(cells, CONFUSION_CELLS),
                    "labeled": [True] * 5,
                    "error": pa.array([None] * 5, pa.string()),
                    "error_kind": pa.array([None] * 5, pa.string()),
                    "class_pixels": [[int(v) for v in rng.integers(0, 10**9, 5)] for _ in range(5)],
                }
            )
        )
    totals = [Totals.of_table(t, 5) for t in tables]
    forward, backward = Totals(5), Totals(5)
    for t in totals:
        forward += t
    for t in reversed(totals):
        backward = t + backward
    mat, counts = reduce_confusion(tables, 5)
    assert np.array_equal(forward.confusion, mat) and np.array_equal(backward.confusion, mat)
    assert forward.counts == counts
    round_trip = Totals.from_metadata({b"segpipe.totals": forward.to_metadata()}, 5)
    assert np.array_equal(round_trip.confusion, mat) and round_trip.counts == counts


def test_many_committed_parts_are_summed_by_ray_tasks(tmp_path, dataset, checkpoint, ray_local):
    """Past a threshold the footers are read by Ray tasks, each summing a group: the same exact totals."""
    from pipeline.execution.reduce import committed_totals
    from pipeline.outputs import stats_path

    cfg = job(dataset, tmp_path / "out", checkpoint=str(checkpoint))
    plan = plan_job(cfg)
    summaries = run_inline(plan.cfg, plan.run_id, plan.pending)
    paths = [stats_path(str(tmp_path / "out"), s.shard_id) for s in plan.shards]
    classes = plan.meta.num_classes
    on_driver = committed_totals(plan.cfg, paths, classes)
    spread = committed_totals(plan.cfg, paths, classes, spread=2, per_task=3)
    for found in (on_driver, spread):
        assert np.array_equal(found.confusion, summaries.totals.confusion)
        assert np.array_equal(found.class_pixels, summaries.totals.class_pixels)
        assert found.counts == summaries.totals.counts
    assert ray_local.is_initialized()  # a Ray the caller started is left running


def test_parts_of_another_job_are_refused_before_and_after_a_plan(tmp_path, dataset, checkpoint):
    """A plan is committed only once the output's parts were checked against it: a job that found another's
    parts never commits its plan, so its rerun checks them again instead of trusting them; and an output holding
    another job's plan and parts is refused before anything is written."""
    from pipeline.errors import InputError

    out = tmp_path / "out"
    first = plan_job(job(dataset, out, checkpoint=str(checkpoint)))
    run_inline(first.cfg, first.run_id, first.pending[:2])  # job A commits two shards, then stops
    other = job(dataset, out, checkpoint=str(checkpoint), precision="bf16")  # job B: the same shard ids
    plan_of_a = (out / PLAN_DIR / "plan.json").read_text()
    with pytest.raises(InputError, match="holds the plan and stats parts of another job"):
        plan_job(other)
    assert (out / PLAN_DIR / "plan.json").read_text() == plan_of_a  # A's plan untouched
    shutil.rmtree(out / PLAN_DIR)  # A's parts without a plan, as a run before plan files left them
    for _ in range(2):
        with pytest.raises(InputError, match="holds results of another job"):
            plan_job(other)
        assert not (out / PLAN_DIR / "plan.json").exists()
    resumed = plan_job(job(dataset, out, checkpoint=str(checkpoint)))  # A itself: its parts are still its own
    assert len(resumed.committed) == 2
