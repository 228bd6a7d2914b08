"""Re-evaluating a finished run with other label settings, in this process on local disk."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from layouts_data import build
from test_job_inputs import config, lay_out, run

from pipeline.config import EvaluateConfig, load_config
from pipeline.errors import ConfigError, InputError
from pipeline.evaluate import evaluate_output


def evaluate(out: Path, labels_uri: Path, /, **fields) -> dict:
    return evaluate_output(
        load_config(None, schema=EvaluateConfig, output_uri=str(out), labels_uri=str(labels_uri), **fields)
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory, checkpoint) -> Path:
    """A finished run over loose files with index-PNG labels, and the same labels as binary and COCO."""
    root = tmp_path_factory.mktemp("eval")
    built = build("files", "index_png")
    lay_out(root, built.files)
    lay_out(root / "binary", {k: v for k, v in build("files", "binary").files.items() if k.startswith("labels/")})
    lay_out(root / "coco", {k: v for k, v in build("files", "coco").files.items() if k.startswith("labels/")})
    run(config(root, checkpoint, built.fields))
    return root


def test_the_same_labels_give_the_run_own_metrics_and_nothing_of_the_run_changes(finished):
    out = finished / "out"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    doc = evaluate(out, finished / "labels")
    run_metrics = json.loads((out / "metrics.json").read_text())
    assert doc["labeled_images"] == run_metrics["labeled_images"] == 8
    for key in ("pixel_accuracy", "mean_iou", "per_class", "labeled_pixels"):
        assert json.dumps(doc[key]) == json.dumps(run_metrics[key])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if "evaluations" not in p.parts} == before
    folder = Path(doc["uri"].removeprefix("file://"))
    assert sorted(p.name for p in folder.iterdir()) == ["confusion_matrix.parquet", "images.parquet", "metrics.json"]
    rows = pq.read_table(folder / "images.parquet").to_pylist()
    assert len(rows) == 8 and all(r["labeled"] for r in rows)


def test_coco_labels_match_the_index_labels_they_were_made_from(finished):
    coco = evaluate(
        finished / "out",
        finished / "coco" / "labels" / "instances.json",
        labels={"format": "coco", "mapping": {11: 1, 12: 2, 13: 3, 14: 4}},
    )
    index = evaluate(finished / "out", finished / "labels")
    assert json.dumps(coco["per_class"]) == json.dumps(index["per_class"])


def test_other_settings_give_other_numbers_in_their_own_folder(finished):
    binary = evaluate(finished / "out", finished / "binary" / "labels", labels={"format": "binary"})
    ignored = evaluate(finished / "out", finished / "labels", ignore_classes=[0])
    same = evaluate(finished / "out", finished / "labels")
    assert len({binary["uri"], ignored["uri"], same["uri"]}) == 3
    assert ignored["per_class"]["background"]["gt_pixels"] == 0 < same["per_class"]["background"]["gt_pixels"]
    assert ignored["per_class"]["circle"]["gt_pixels"] == same["per_class"]["circle"]["gt_pixels"]
    # Binary labels know circles only, and mark no pixel ignore: every other pixel is background there.
    sizes = pq.read_table(finished / "out" / "stats", columns=["width", "height"]).to_pylist()
    assert binary["labeled_pixels"] == sum(r["width"] * r["height"] for r in sizes)
    assert (
        binary["per_class"]["background"]["gt_pixels"]
        == binary["labeled_pixels"] - same["per_class"]["circle"]["gt_pixels"]
    )


def test_an_output_without_a_finished_run_is_refused(tmp_path, finished):
    with pytest.raises(InputError, match=f"output {tmp_path} holds no manifest.json: not a finished segpipe run"):
        evaluate(tmp_path, finished / "labels")
    assert list(tmp_path.iterdir()) == []


def test_a_broken_coco_json_names_the_labels_uri(finished, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match=f"labels {bad}: "):
        evaluate(finished / "out", bad, labels={"format": "coco"})
