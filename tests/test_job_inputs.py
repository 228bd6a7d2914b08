"""Jobs over damaged or surprising inputs, in this process on local disk: error rows, not lost runs;
bad settings stop before any work with a message naming the field or path."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from layouts_data import build, samples

from pipeline.config import load_config
from pipeline.errors import ConfigError, InputError
from pipeline.execution import run_inline
from pipeline.job import finalize_job, plan_job


def lay_out(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def config(root: Path, checkpoint: Path, fields: dict, **extra):
    fields = dict(fields) | extra
    for key in ("input_uri", "labels_uri"):
        if key in fields:
            fields[key] = str(root / fields[key])
    return load_config(None, **fields, output_uri=str(root / "out"), checkpoint_uri=str(checkpoint), shard_size=4)


def run(cfg) -> tuple[dict, list[dict]]:
    plan = plan_job(cfg)
    result = finalize_job(plan, run_inline(plan.cfg, plan.run_id, plan.pending), 1.0)
    out = Path(cfg.output_uri)
    rows = pq.read_table(sorted((out / "stats").glob("part-*.parquet"))).to_pylist()
    return result, rows


def test_ids_that_would_escape_the_output_or_repeat_become_error_rows(tmp_path, checkpoint):
    _, ext, image, _ = samples()[0]
    ids = ["ok.jpg", "../../escape.jpg", "ok.jpg", "/abs.jpg", "a//b.jpg"]
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ids, "image": [image] * len(ids)}), buf)
    lay_out(tmp_path, {"table/t.parquet": buf.getvalue()})
    result, rows = run(config(tmp_path, checkpoint, {"input_uri": "table", "input": {"id_column": "id"}}))

    assert [r["image_id"] for r in rows] == ids
    assert rows[0]["error"] is None and rows[0]["mask_uri"]
    assert "duplicate image id" in rows[2]["error"]
    for r in (rows[1], rows[3], rows[4]):
        assert "cannot name a mask file" in r["error"] and r["mask_uri"] is None
    assert result["manifest"]["counts"]["errors"] == 4
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert written == ["out/masks/ok.jpg.png"]


def test_a_truncated_tar_keeps_the_samples_before_the_damage_and_reports_it(tmp_path, checkpoint):
    built = build("webdataset", "index_png")
    tar = built.files["shards/train-001.tar"]
    built.files["shards/train-001.tar"] = tar[: len(tar) // 2]
    lay_out(tmp_path, built.files)
    result, rows = run(config(tmp_path, checkpoint, built.fields))

    by_id = {r["image_id"]: r for r in rows}
    assert all(by_id[i]["error"] is None and by_id[i]["labeled"] for i in built.expected if i.startswith("train-000/"))
    damaged = [r for r in rows if r["image_id"].startswith("train-001/")]
    assert damaged[-1]["image_id"] == "train-001/<unreadable>"
    assert damaged[-1]["error"].startswith("tar is corrupt or truncated after")
    assert all(r["error"] is None for r in damaged[:-1]) and len(damaged) <= 4
    assert result["manifest"]["status"] == "complete" and result["manifest"]["counts"]["errors"] == 1


@pytest.mark.parametrize(
    ("layout", "member"), [("webdataset", "shards/train-000.tar"), ("parquet", "table/part-0.parquet")]
)
def test_a_single_tar_or_parquet_file_as_input_is_detected(tmp_path, checkpoint, layout, member):
    built = build(layout, "index_png")
    lay_out(tmp_path, built.files)
    result, rows = run(config(tmp_path, checkpoint, built.fields, input_uri=member))
    assert result["manifest"]["config"]["input"]["layout"] == layout
    expected = [i for i in built.expected if layout == "parquet" or i.startswith("train-000/")]
    assert sorted(r["image_id"] for r in rows) == sorted(expected)
    assert all(r["error"] is None and r["labeled"] for r in rows)


def test_a_label_that_cannot_be_converted_is_an_error_row_and_the_mask_is_kept(tmp_path, checkpoint):
    built = build("files", "labelme")
    doc = json.loads(built.files["labels/0/s000.json"])
    doc["shapes"][0]["label"] = "giraffe"
    built.files["labels/0/s000.json"] = json.dumps(doc).encode()
    lay_out(tmp_path, built.files)
    _, rows = run(config(tmp_path, checkpoint, built.fields))
    bad = next(r for r in rows if r["image_id"] == "0/s000.jpg")
    assert "giraffe" in bad["error"] and not bad["labeled"] and bad["mask_uri"]
    assert sum(r["labeled"] for r in rows) == len(rows) - 1


def test_labels_uri_with_a_layout_that_carries_its_labels_is_refused(tmp_path, checkpoint):
    built = build("webdataset", "index_png")
    lay_out(tmp_path, built.files | {"labels/x.png": b""})
    with pytest.raises(ConfigError, match="^labels_uri: the webdataset layout carries its labels"):
        plan_job(config(tmp_path, checkpoint, built.fields, labels_uri="labels"))
    assert not (tmp_path / "out").exists()


def test_a_broken_coco_json_stops_before_any_work(tmp_path, checkpoint):
    built = build("files", "coco")
    built.files["labels/instances.json"] = b'{"images": [], "annotations": []}'  # no categories
    lay_out(tmp_path, built.files)
    with pytest.raises(ConfigError, match=f"labels {tmp_path}/labels/instances.json: .*not a COCO instances JSON"):
        plan_job(config(tmp_path, checkpoint, built.fields))
    assert not (tmp_path / "out").exists()


def test_labels_with_more_classes_than_the_model_stop_before_any_work(tmp_path, checkpoint):
    built = build("files", "cityscapes")
    lay_out(tmp_path, built.files)
    with pytest.raises(
        ConfigError, match=r"labels.format: cityscapes labels have 19 classes but the model .* predicts 5"
    ):
        plan_job(config(tmp_path, checkpoint, built.fields))


def test_an_input_with_nothing_to_segment_names_what_was_looked_for(tmp_path, checkpoint):
    lay_out(tmp_path, {"in/readme.txt": b"hello"})
    with pytest.raises(InputError, match="holds no images .* tar shards, Parquet files or manifests"):
        plan_job(config(tmp_path, checkpoint, {"input_uri": "in"}))


def test_a_checkpoint_whose_sha256_differs_from_the_one_configured_is_refused(tmp_path, checkpoint):
    from pipeline.errors import CheckpointError
    from pipeline.models.checkpoint import sha256_hex

    built = build("files", "index_png")
    lay_out(tmp_path, built.files)
    with pytest.raises(CheckpointError, match=f"has sha256 {sha256_hex(checkpoint.read_bytes())}, but {'0' * 64}"):
        plan_job(config(tmp_path, checkpoint, built.fields, checkpoint_sha256="0" * 64))
    plan = plan_job(config(tmp_path, checkpoint, built.fields, checkpoint_sha256=sha256_hex(checkpoint.read_bytes())))
    assert plan.cfg.checkpoint_sha256 == plan.checkpoint_sha256
