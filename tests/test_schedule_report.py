"""Dated URIs for scheduled runs, and the contents of the run's artifacts."""

from __future__ import annotations

import json
from datetime import date, datetime

import pytest

from pipeline.config import load_config
from pipeline.outputs import Manifest, ModelInfo, RunCounts, ShardEntry, Timings
from pipeline.report import metrics_table, summary_markdown
from pipeline.schedule import parse_run_date, render_uri, render_uris


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("s3://b/out/{date}", "s3://b/out/2026-11-21"),
        ("s3://b/out/{date:%Y/%m/%d}/masks", "s3://b/out/2026/11/21/masks"),
        ("s3://b/{date}/x/{date:%d}", "s3://b/2026-11-21/x/21"),
        ("s3://b/no-template", "s3://b/no-template"),
        (None, None),
    ],
)
def test_render_uri(template, expected):
    assert render_uri(template, date(2026, 11, 21)) == expected
    assert render_uri(template, datetime(2026, 11, 21, 23, 59)) == expected


def test_render_uris_fills_input_labels_and_output_only(tmp_path):
    cfg = load_config(
        input_uri="s3://b/in/{date}",
        labels_uri="s3://b/labels/{date}",
        output_uri="s3://b/out/{date}",
        checkpoint_uri="s3://b/models/{date}.pt",
    )
    got = render_uris(cfg, date(2026, 1, 2))
    assert (got.input_uri, got.labels_uri, got.output_uri) == (
        "s3://b/in/2026-01-02",
        "s3://b/labels/2026-01-02",
        "s3://b/out/2026-01-02",
    )
    assert got.checkpoint_uri == "s3://b/models/{date}.pt"


def test_run_date_must_be_iso():
    assert parse_run_date("2026-02-28") == date(2026, 2, 28)
    with pytest.raises(ValueError, match="run_date must be YYYY-MM-DD, got '28/02/2026'"):
        parse_run_date("28/02/2026")


MANIFEST = Manifest(
    run_id="abc123",
    status="complete",
    started_at="2026-01-02T03:00:00+00:00",
    finished_at="2026-01-02T03:00:01+00:00",
    code_version="0.1.0",
    config={"output_uri": "s3://b/out", "input_uri": "s3://b/in", "input": {"layout": "webdataset"}},
    model=ModelInfo(
        name="unet_tiny",
        checkpoint_uri="s3://m.pt",
        checkpoint_sha256="f" * 64,
        class_names=["bg", "cat"],
        palette=[[0, 0, 0], [128, 0, 0]],
        normalization={"mean": [0.5] * 3, "std": [0.5] * 3},
        input_policy="pad",
        stride=8,
    ),
    counts=RunCounts(images=10, errors=1, labeled=9, shards=2, shards_skipped=1),
    shards=[
        ShardEntry(shard_id="00000-a", images=5, status="processed"),
        ShardEntry(shard_id="00001-b", images=5, status="skipped (committed earlier)"),
    ],
    timings=Timings(images_per_second=12.5, plan_seconds=0.1, infer_seconds=0.8, reduce_seconds=0.05),
)
METRICS = {
    "labeled_pixels": 100,
    "pixel_accuracy": 0.9,
    "mean_accuracy": 0.8,
    "mean_iou": 0.7,
    "frequency_weighted_iou": float("nan"),
    "per_class": {
        "bg": {"iou": 0.75, "dice": 0.8, "precision": 0.9, "recall": 0.7},
        "cat": {"iou": 0.65, "dice": 0.7, "precision": float("nan"), "recall": 0.6},
    },
}


def test_metrics_table_has_dataset_rows_then_four_per_class():
    rows = metrics_table(METRICS)
    assert rows[:4] == [
        {"metric": "pixel_accuracy", "class": "(dataset)", "value": 0.9},
        {"metric": "mean_accuracy", "class": "(dataset)", "value": 0.8},
        {"metric": "mean_iou", "class": "(dataset)", "value": 0.7},
        {"metric": "frequency_weighted_iou", "class": "(dataset)", "value": None},
    ]
    assert rows[4:8] == [
        {"metric": m, "class": "bg", "value": v}
        for m, v in zip(("iou", "dice", "precision", "recall"), (0.75, 0.8, 0.9, 0.7), strict=True)
    ]
    assert rows[10] == {"metric": "precision", "class": "cat", "value": None}
    assert len(rows) == 12


def test_summary_markdown_names_where_how_many_and_how_fast():
    text = summary_markdown(MANIFEST, METRICS)
    for needle in (
        "`s3://b/out`",
        "(webdataset)",
        "`unet_tiny` (2 classes)",
        "10 (1 errors, 9 labeled)",
        "2 (1 skipped",
        "12.5 images/s",
        "70.00%",
    ):
        assert needle in text


def test_the_manifest_round_trips_through_json_and_refuses_a_missing_or_unknown_field():
    doc = json.loads(json.dumps(MANIFEST.to_json()))
    assert Manifest.from_json(doc) == MANIFEST
    del doc["counts"]["labeled"]
    with pytest.raises(TypeError, match="labeled"):
        Manifest.from_json(doc)
    with pytest.raises(TypeError, match="colour"):
        Manifest.from_json(MANIFEST.to_json() | {"colour": "red"})
