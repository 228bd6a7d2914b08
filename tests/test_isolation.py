"""No single image fails a job: one above the pixel limit, one the model raises on, one that kills the model's
process: each becomes its own error row with its reason and kind, every other image gets its normal row, the
run completes and counts such images by kind."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.execution import run_inline
from pipeline.job import finalize_job, plan_job
from pipeline.models import get_model
from pipeline.models.checkpoint import default_meta, save_checkpoint
from pipeline.shard import PROCESS_DIED


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def dataset(root: Path, poison: set[str], large: set[str] = frozenset()) -> Path:
    """Eight small images (``poison`` ones pure magenta, ``large`` ones 200x300) named 0.png ... 7.png."""
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(8):
        name = f"{i}.png"
        shape = (200, 300, 3) if name in large else (40, 50, 3)
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        if name in poison:
            array[:] = (255, 0, 255)
        (images / name).write_bytes(png(array))
    return images


def faults_checkpoint(root: Path, on_poison: str) -> Path:
    model = get_model("faults_1x1", num_classes=3, on_poison=on_poison)
    path = root / f"faults-{on_poison}.pt"
    path.write_bytes(save_checkpoint(model, default_meta("faults_1x1", ("a", "b", "c"), on_poison=on_poison)))
    return path


def job(images: Path, checkpoint: Path, out: Path, **fields):
    cfg = load_config(
        None, input_uri=str(images), output_uri=str(out), checkpoint_uri=str(checkpoint), shard_size=4, **fields
    )
    return plan_job(cfg)


def rows_of(out: Path) -> dict[str, dict]:
    table = pq.read_table(sorted((out / "stats").glob("part-*.parquet")))
    return {r["image_id"]: r for r in table.to_pylist()}


def assert_normal(rows: dict[str, dict], out: Path, names) -> None:
    for name in names:
        row = rows[name]
        assert row["error"] is None and row["error_kind"] is None, row
        assert (out / "masks" / f"{name}.png").exists() and row["class_pixels"] is not None


def test_a_too_large_image_and_one_the_model_raises_on_are_error_rows(tmp_path):
    images = dataset(tmp_path, poison={"2.png"}, large={"5.png"})
    out = tmp_path / "out"
    plan = job(images, faults_checkpoint(tmp_path, "raise"), out, max_image_pixels=50_000, batch_size=8)
    result = finalize_job(plan, run_inline(plan.cfg, plan.run_id, plan.pending), 1.0)

    rows = rows_of(out)
    assert rows["2.png"]["error_kind"] == "model"
    assert rows["2.png"]["error"] == "the model failed on this image: RuntimeError: poisoned input"
    assert rows["5.png"]["error_kind"] == "too_large"
    assert "300x200 = 60,000 pixels, above max_image_pixels (50,000)" in rows["5.png"]["error"]
    assert rows["2.png"]["mask_uri"] is None and rows["5.png"]["mask_uri"] is None
    assert_normal(rows, out, [f"{i}.png" for i in (0, 1, 3, 4, 6, 7)])
    counts = result["manifest"]["counts"]
    assert result["manifest"]["status"] == "complete"
    assert (counts["images"], counts["errors"], counts["error_kinds"]) == (8, 2, {"model": 1, "too_large": 1})


@pytest.mark.slow
def test_an_image_that_kills_the_model_process_is_an_error_row(tmp_path, ray_local, caplog):
    """The actor's process really dies (SIGKILL from inside the model); the shard is rerun image by image,
    the rerun dies on the same image, and the third attempt writes it as an error row."""
    from pipeline.execution import run_shards

    images = dataset(tmp_path, poison={"1.png", "6.png"})
    out = tmp_path / "out"
    plan = job(images, faults_checkpoint(tmp_path, "kill"), out, actors=1, shard_retries=1, batch_size=8)
    with caplog.at_level(logging.WARNING, logger="pipeline.execution.ray_pool"):
        summaries = run_shards(plan.cfg, plan.run_id, plan.pending)
    result = finalize_job(plan, summaries, 1.0)

    rows = rows_of(out)
    for name in ("1.png", "6.png"):
        assert (rows[name]["error"], rows[name]["error_kind"]) == (PROCESS_DIED, "process_died")
    assert_normal(rows, out, [f"{i}.png" for i in (0, 2, 3, 4, 5, 7)])
    assert result["manifest"]["counts"]["error_kinds"] == {"process_died": 2}
    killers = [r.getMessage() for r in caplog.records if "killed its actor" in r.getMessage()]
    assert len(killers) == 2 and any("image 1.png" in m for m in killers) and any("image 6.png" in m for m in killers)
    assert not (out / "_segmenting").exists() or not any((out / "_segmenting").iterdir())
