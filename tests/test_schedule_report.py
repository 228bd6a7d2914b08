"""Dated URIs for scheduled runs, and the contents of the run's artifacts."""

from __future__ import annotations

from datetime import date, datetime

import pytest

from pipeline.config import load_config
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


RESULT = {
    "manifest": {
        "run_id": "abc123",
        "config": {"output_uri": "s3://b/out", "input_uri": "s3://b/in", "input": {"layout": "webdataset"}},
        "model": {
            "name": "unet_tiny",
            "class_names": ["bg", "cat"],
            "checkpoint_uri": "s3://m.pt",
            "checkpoint_sha256": "f" * 64,
        },
        "counts": {"images": 10, "errors": 1, "labeled": 9, "shards": 2, "shards_skipped": 1},
        "timings": {"images_per_second": 12.5, "plan_seconds": 0.1, "infer_seconds": 0.8, "reduce_seconds": 0.05},
    },
    "metrics": {
        "labeled_pixels": 100,
        "pixel_accuracy": 0.9,
        "mean_accuracy": 0.8,
        "mean_iou": 0.7,
        "frequency_weighted_iou": float("nan"),
        "per_class": {
            "bg": {"iou": 0.75, "dice": 0.8, "precision": 0.9, "recall": 0.7},
            "cat": {"iou": 0.65, "dice": 0.7, "precision": float("nan"), "recall": 0.6},
        },
    },
}


def test_metrics_table_has_dataset_rows_then_four_per_class():
    rows = metrics_table(RESULT)
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
    text = summary_markdown(RESULT)
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
