"""The segment-dataset flow end to end: real Prefect (ephemeral), real local Ray, real files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.images import decode_rgb
from pipeline.metrics import ConfusionMatrix, compute_metrics
from pipeline.models.checkpoint import load_checkpoint
from pipeline.outputs import STATS_SCHEMA
from pipeline.palette import png_to_mask, voc_colormap

pytestmark = pytest.mark.slow


def run_flow(**params) -> dict:
    from flows.segment_dataset import segment_dataset

    return segment_dataset(**params)


def read_stats(out: Path):
    return pq.read_table(sorted((out / "stats").glob("part-*.parquet"))).sort_by("image_id")


def row_for_label(rows: dict, labels: Path, label_file: Path) -> dict:
    stem = label_file.relative_to(labels).with_suffix("").as_posix()
    return next(r for image_id, r in rows.items() if image_id.rsplit(".", 1)[0] == stem)


def plain_forward(model, meta, image: np.ndarray) -> np.ndarray:
    """The reference: one image, no batching, no threads, straight through the model."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
    x = (x - torch.tensor(meta.mean).view(1, 3, 1, 1)) / torch.tensor(meta.std).view(1, 3, 1, 1)
    h, w = image.shape[:2]
    s = meta.stride
    x = torch.nn.functional.pad(x, (0, (-w) % s, 0, (-h) % s))
    with torch.no_grad():
        logits = model(x)[..., :h, :w]
    return logits.argmax(1)[0].numpy().astype(np.uint8)


def first_run_params(dataset: Path, checkpoint: Path, out: Path) -> dict:
    return dict(
        input_uri=str(dataset / "images"),
        labels_uri=str(dataset / "labels"),
        output_uri=str(out),
        checkpoint_uri=str(checkpoint),
        shard_size=8,
        actors=2,
        batch_size=4,
    )


@pytest.fixture(scope="module")
def first_run(dataset, checkpoint, tmp_path_factory, ray_local, prefect_ephemeral):
    out = tmp_path_factory.mktemp("run") / "out"
    return out, run_flow(**first_run_params(dataset, checkpoint, out))


def test_every_output_exists_with_the_documented_schema(first_run, dataset):
    out, result = first_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert "segpipe run" in (out / "report.html").read_text()
    assert manifest["counts"] == {
        "images": 24,
        "errors": 0,
        "labeled": 24,
        "shards": 3,
        "shards_skipped": 0,
        "error_kinds": {},
    }
    assert len(manifest["model"]["checkpoint_sha256"]) == 64
    assert manifest["model"]["class_names"] == ["background", "circle", "rectangle", "triangle", "star"]
    table = read_stats(out)
    assert table.schema.remove_metadata().equals(STATS_SCHEMA)
    assert table.num_rows == 24
    images = sorted(p.relative_to(dataset / "images").as_posix() for p in (dataset / "images").rglob("*.*"))
    assert table["image_id"].to_pylist() == images
    for row in table.to_pylist():
        assert row["error"] is None and row["labeled"]
        assert sum(row["class_pixels"]) == row["width"] * row["height"]
        assert abs(sum(row["class_fraction"]) - 1) < 1e-4
        assert 0.2 <= row["mean_confidence"] <= 1.0
        mask_file = Path(row["mask_uri"].removeprefix("file://"))
        assert mask_file == out / "masks" / f"{row['image_id']}.png"
        with Image.open(mask_file) as m:
            assert m.mode == "P" and m.size == (row["width"], row["height"])
            assert np.array_equal(np.array(m.getpalette()[:768], np.uint8).reshape(-1, 3), voc_colormap())
    conf = pq.read_table(out / "confusion_matrix.parquet")
    assert conf.column_names == ["ground_truth"] + [f"pred_{n}" for n in manifest["model"]["class_names"]]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mean_iou"] == result["metrics"]["mean_iou"]
    assert "nan_policy" in metrics["definitions"]


def test_shipped_checkpoint_really_segments(first_run):
    """The demo promise: mean IoU >= 0.85 on images of a seed the checkpoint never saw."""
    _, result = first_run
    assert result["metrics"]["mean_iou"] >= 0.85
    assert all(c["iou"] >= 0.7 for c in result["metrics"]["per_class"].values())


def test_masks_agree_with_a_plain_single_image_forward(first_run, dataset, checkpoint):
    out, _ = first_run
    model, meta = load_checkpoint(checkpoint.read_bytes(), str(checkpoint))
    agree = total = 0
    for row in read_stats(out).to_pylist():
        image = decode_rgb((dataset / "images" / row["image_id"]).read_bytes())
        written = png_to_mask((out / "masks" / f"{row['image_id']}.png").read_bytes())
        reference = plain_forward(model, meta, image)
        agree += int((written == reference).sum())
        total += written.size
    assert agree / total >= 0.9999


def test_metrics_equal_metrics_recomputed_from_written_masks_and_labels(first_run, dataset):
    out, _ = first_run
    metrics = json.loads((out / "metrics.json").read_text())
    cm = ConfusionMatrix(len(metrics["class_names"]))
    for mask_file in (out / "masks").rglob("*.png"):
        rel = mask_file.relative_to(out / "masks").with_suffix("").with_suffix(".png")
        cm.update(png_to_mask((dataset / "labels" / rel).read_bytes()), png_to_mask(mask_file.read_bytes()))
    expected = compute_metrics(cm.mat)
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-12)
    written = pq.read_table(out / "confusion_matrix.parquet").drop(["ground_truth"])
    assert np.array_equal(np.column_stack([c.to_numpy() for c in written.columns]), cm.mat)


def test_analysts_queries_from_the_readme_run_in_duckdb(first_run):
    out, _ = first_run
    stats = f"{out}/stats/*.parquet"
    freq = duckdb.sql(
        f"""
        SELECT c.idx - 1 AS class_index, sum(c.px) AS pixels
        FROM (SELECT unnest(class_pixels) AS px, generate_subscripts(class_pixels, 1) AS idx
              FROM read_parquet('{stats}') WHERE error IS NULL) AS c
        GROUP BY class_index ORDER BY class_index
        """
    ).fetchall()
    table = read_stats(out)
    expected = np.sum(np.array(table["class_pixels"].to_pylist()), axis=0)
    assert [p for _, p in freq] == expected.tolist()
    worst = duckdb.sql(
        f"SELECT image_id, mean_iou FROM read_parquet('{stats}') WHERE labeled ORDER BY mean_iou LIMIT 10"
    ).fetchall()
    assert len(worst) == 10
    assert [v for _, v in worst] == sorted(table["mean_iou"].to_pylist())[:10]


def test_other_shard_size_batch_size_and_actor_count_give_identical_metrics(first_run, dataset, checkpoint, tmp_path):
    out, result = first_run
    other = run_flow(
        input_uri=str(dataset / "images"),
        labels_uri=str(dataset / "labels"),
        output_uri=str(tmp_path / "out"),
        checkpoint_uri=str(checkpoint),
        shard_size=5,
        actors=1,
        batch_size=3,
        outputs={"report": False},  # metrics are compared here; the first run's report is checked below
    )
    assert other["manifest"]["counts"]["shards"] == 5
    mine, theirs = (json.loads((o / "metrics.json").read_text()) for o in (out, tmp_path / "out"))
    assert mine.pop("run_id") != theirs.pop("run_id")  # the shard size is part of the job's identity
    assert mine == theirs  # NaN is written as null, so this compares every figure exactly
    a = pq.read_table(out / "confusion_matrix.parquet")
    b = pq.read_table(tmp_path / "out" / "confusion_matrix.parquet")
    assert a.equals(b)


def test_rerun_into_the_same_output_skips_committed_shards(first_run, dataset, checkpoint):
    out, result = first_run
    before = read_stats(out)
    again = run_flow(**first_run_params(dataset, checkpoint, out))
    assert again["manifest"]["counts"]["shards_skipped"] == 3
    assert again["metrics"]["run_id"] == result["metrics"]["run_id"]
    assert again["metrics"]["mean_iou"] == result["metrics"]["mean_iou"]
    assert read_stats(out).equals(before)


def test_output_of_another_job_is_refused_and_left_untouched(first_run, dataset, checkpoint):
    from pipeline.errors import InputError

    out, _ = first_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(InputError, match="another job"):
        run_flow(
            input_uri=str(dataset / "images"),
            output_uri=str(out),
            checkpoint_uri=str(checkpoint),
            shard_size=6,  # other shards: results would not be comparable with what is there
        )
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_bad_files_become_error_rows_and_the_run_completes(
    dataset_copy, checkpoint, tmp_path, ray_local, prefect_ephemeral
):
    images, labels = dataset_copy / "images", dataset_copy / "labels"
    (images / "corrupt.jpg").write_bytes(b"this is not an image at all" * 10)
    (images / "empty.png").write_bytes(b"")
    good_jpeg = next(images.rglob("*.jpg")).read_bytes()
    (images / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    # A label of the wrong size and a label with a class id the model does not have.
    wrong_size = sorted(labels.rglob("*.png"))[0]
    buf = io.BytesIO()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(buf, format="PNG")
    wrong_size.write_bytes(buf.getvalue())
    bad_ids = sorted(labels.rglob("*.png"))[1]
    lbl = png_to_mask(bad_ids.read_bytes())
    lbl[0, 0] = 17
    buf = io.BytesIO()
    Image.fromarray(lbl).save(buf, format="PNG")
    bad_ids.write_bytes(buf.getvalue())

    out = tmp_path / "out"
    result = run_flow(
        input_uri=str(images), labels_uri=str(labels), output_uri=str(out), checkpoint_uri=str(checkpoint), shard_size=8
    )
    rows = {r["image_id"]: r for r in read_stats(out).to_pylist()}
    assert len(rows) == 27
    assert "empty file" in rows["empty.png"]["error"]
    assert "cannot decode" in rows["corrupt.jpg"]["error"]
    assert "cannot decode" in rows["truncated.jpg"]["error"]
    for name in ("empty.png", "corrupt.jpg", "truncated.jpg"):
        assert rows[name]["mask_uri"] is None and not rows[name]["labeled"]
    size_row = row_for_label(rows, labels, wrong_size)
    assert "label is 10x10" in size_row["error"] and not size_row["labeled"]
    assert size_row["mask_uri"] is not None  # the prediction itself is kept
    ids_row = row_for_label(rows, labels, bad_ids)
    assert "[17]" in ids_row["error"]
    assert result["manifest"]["status"] == "complete"
    assert result["manifest"]["counts"]["errors"] == 5
    assert result["manifest"]["counts"]["error_kinds"] == {"input": 3, "label": 2}
    assert result["metrics"]["labeled_images"] == 22


SLIDE = {"mode": "slide", "tile": [96, 96], "overlap": 0.25}  # every image of the dataset (128-192 px) slides


@pytest.fixture(scope="module")
def slide_run(dataset, checkpoint, tmp_path_factory, ray_local, prefect_ephemeral):
    out = tmp_path_factory.mktemp("slide") / "out"
    return out, run_flow(**first_run_params(dataset, checkpoint, out), inference=SLIDE)


def test_slide_mode_masks_are_the_predictors_and_still_segment(slide_run, dataset, checkpoint):
    from pipeline.config import InferenceConfig
    from pipeline.inference.plan import plan_inference
    from pipeline.inference.predictor import Predictor

    out, result = slide_run
    assert result["manifest"]["inference"] == {**SLIDE, "blend": "gaussian", "tta": ["plain@1"]}
    assert result["metrics"]["mean_iou"] >= 0.8
    model, meta = load_checkpoint(checkpoint.read_bytes(), str(checkpoint))
    alone = Predictor(model, meta, device="cpu", batch_size=1, plan=plan_inference(InferenceConfig(**SLIDE), meta))
    for row in read_stats(out).to_pylist()[:6]:
        image = decode_rgb((dataset / "images" / row["image_id"]).read_bytes())
        written = png_to_mask((out / "masks" / f"{row['image_id']}.png").read_bytes())
        reference = alone.predict([image])[0]
        assert np.array_equal(written, reference.mask)
        assert row["mean_confidence"] == pytest.approx(reference.mean_confidence, rel=1e-6)


def test_slide_mode_metrics_do_not_depend_on_shards_batches_or_actors(slide_run, dataset, checkpoint, tmp_path):
    out, _ = slide_run
    params = first_run_params(dataset, checkpoint, tmp_path / "out") | dict(shard_size=5, actors=1, batch_size=3)
    run_flow(**params, inference=SLIDE, outputs={"report": False})
    mine, theirs = (json.loads((o / "metrics.json").read_text()) for o in (out, tmp_path / "out"))
    assert mine.pop("run_id") != theirs.pop("run_id")
    assert mine == theirs
    assert pq.read_table(out / "confusion_matrix.parquet").equals(
        pq.read_table(tmp_path / "out" / "confusion_matrix.parquet")
    )
