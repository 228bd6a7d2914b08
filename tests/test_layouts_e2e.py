"""Every input layout with every label format, end to end against the real S3 server.

Each job is planned, run and finalized in this process (``run_inline``: the same ShardProcessor the
Ray actors hold), reading from and writing to SeaweedFS. Every stats row's confusion must equal the
confusion of the mask actually written against the label the test meant, and the metrics must be
those of the summed confusions. The flow and Ray path over a tar input is exercised at the end.
"""

from __future__ import annotations

import json
import uuid

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from layouts_data import FORMATS, LAYOUTS, build

from pipeline.config import load_config
from pipeline.execution import run_inline
from pipeline.job import finalize_job, plan_job
from pipeline.labels.cityscapes import CITYSCAPES_CLASSES
from pipeline.metrics import compute_metrics, confusion_counts
from pipeline.models import get_model
from pipeline.models.checkpoint import ModelMeta, save_checkpoint
from pipeline.palette import png_to_mask
from pipeline.stats import sparse_confusion

pytestmark = [pytest.mark.s3, pytest.mark.slow]

LOCATION_COLUMNS = ["run_id", "source_uri", "mask_uri", "label_uri"]  # where things are, and the job's id


@pytest.fixture(scope="module")
def bucket(s3_server, checkpoint) -> str:
    """A bucket holding the demo checkpoint and an untrained 19-class one for Cityscapes labels."""
    import torch

    fs = s3_server.fs()
    name = f"layouts-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    fs.put(str(checkpoint), f"{name}/models/demo.pt")
    torch.manual_seed(0)
    model = get_model("unet_tiny", num_classes=len(CITYSCAPES_CLASSES))
    meta = ModelMeta("unet_tiny", tuple(CITYSCAPES_CLASSES), stride=16)
    fs.pipe_file(f"{name}/models/cityscapes.pt", save_checkpoint(model, meta))
    return name


def upload(fs, prefix: str, files: dict[str, bytes]) -> None:
    fs.pipe({f"{prefix}/{rel}": data for rel, data in files.items()})


def run_job(built, data_uri: str, out_uri: str, checkpoint_uri: str, storage: dict | None = None) -> dict:
    fields = dict(built.fields)
    for key in ("input_uri", "labels_uri"):
        if key in fields:
            fields[key] = f"{data_uri}/{fields[key]}"
    cfg = load_config(
        None,
        **fields,
        output_uri=out_uri,
        checkpoint_uri=checkpoint_uri,
        shard_size=3,
        batch_size=2,
        storage=storage or {},
    )
    plan = plan_job(cfg)
    return finalize_job(plan, run_inline(plan.cfg, plan.run_id, plan.pending), 1.0)


def stats(fs, out: str):
    return pq.read_table(sorted(fs.glob(f"{out}/stats/part-*.parquet")), filesystem=fs).sort_by("image_id")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_and_label_format_end_to_end(s3_server, bucket, layout, fmt, tmp_path, checkpoint):
    built = build(layout, fmt)
    fs = s3_server.fs()
    prefix = f"{bucket}/{layout}-{fmt}"
    upload(fs, prefix, built.files)
    model = "cityscapes" if fmt == "cityscapes" else "demo"
    result = run_job(
        built, f"s3://{prefix}", f"s3://{prefix}/out", f"s3://{bucket}/models/{model}.pt", s3_server.storage_config()
    )

    rows = stats(fs, f"{prefix}/out")
    assert sorted(rows["image_id"].to_pylist()) == sorted(built.expected)
    num_classes = len(result["metrics"]["class_names"])
    total = np.zeros((num_classes, num_classes), np.int64)
    for row in rows.to_pylist():
        assert row["error"] is None and row["labeled"], row
        mask = png_to_mask(fs.cat_file(row["mask_uri"]))
        mat = confusion_counts(built.expected[row["image_id"]], mask, num_classes)
        assert row["confusion"] == sparse_confusion(mat), row["image_id"]
        total += mat
    assert result["metrics"]["labeled_images"] == len(built.expected)
    assert result["metrics"]["mean_iou"] == pytest.approx(compute_metrics(total)["mean_iou"], nan_ok=True)

    if fmt == "index_png":  # the same dataset on local disk gives the same rows and metrics
        local = tmp_path / "data"
        for rel, data in built.files.items():
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            (local / rel).write_bytes(data)
        local_result = run_job(built, str(local), str(tmp_path / "out"), str(checkpoint))
        local_rows = stats(fsspec.filesystem("file"), str(tmp_path / "out"))
        assert local_rows.drop(LOCATION_COLUMNS).equals(rows.drop(LOCATION_COLUMNS))
        local_result["metrics"].pop("run_id")
        result["metrics"].pop("run_id")
        assert json.dumps(local_result["metrics"]) == json.dumps(result["metrics"])  # NaN-safe equality


def test_tar_shards_through_the_flow_on_ray_actors(s3_server, bucket, ray_local, prefect_ephemeral, tmp_path):
    """The orchestrated path: Prefect flow, two threaded Ray actors streaming tars from S3; the rows equal
    those of the inline run over the same tars."""
    import yaml

    from flows.segment_dataset import segment_dataset

    built = build("webdataset", "index_png")
    fs = s3_server.fs()
    prefix = f"{bucket}/flow-tars"
    upload(fs, prefix, built.files)
    inline = run_job(
        built, f"s3://{prefix}", f"s3://{prefix}/inline", f"s3://{bucket}/models/demo.pt", s3_server.storage_config()
    )
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "input_uri": f"s3://{prefix}/shards",
                "output_uri": f"s3://{prefix}/flow",
                "checkpoint_uri": f"s3://{bucket}/models/demo.pt",
                "input": built.fields["input"],
                "storage": s3_server.storage_config(),
            }
        )
    )
    result = segment_dataset(config_path=str(job), actors=2, batch_size=2)

    assert result["manifest"]["counts"]["shards"] == 2
    assert [s["images"] for s in result["manifest"]["shards"]] == [4, 4]
    flow_rows, inline_rows = stats(fs, f"{prefix}/flow"), stats(fs, f"{prefix}/inline")
    assert flow_rows.num_rows == len(built.expected)
    assert flow_rows.drop(LOCATION_COLUMNS).equals(inline_rows.drop(LOCATION_COLUMNS))
    assert result["metrics"]["mean_iou"] == inline["metrics"]["mean_iou"]
    report = fs.cat_file(f"{prefix}/flow/report.html").decode()  # on S3; the tars' images are not fetched
    assert "image inside a shard: not fetched" in report and "cannot be drawn" not in report
