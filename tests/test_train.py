"""segpipe train: a short real run writes a loadable checkpoint that carries its metadata."""

from __future__ import annotations

from pipeline.models.checkpoint import load_checkpoint
from pipeline.synthetic import CLASS_NAMES, make_dataset
from pipeline.train import TrainConfig, train


def test_short_training_run_writes_a_usable_checkpoint(tmp_path):
    make_dataset(tmp_path / "train", 12, seed=101)
    make_dataset(tmp_path / "val", 4, seed=102)
    out = tmp_path / "ckpt.pt"
    result = train(
        TrainConfig(
            data_uri=str(tmp_path / "train"),
            val_uri=str(tmp_path / "val"),
            output=str(out),
            class_names=CLASS_NAMES,
            epochs=2,
            steps_per_epoch=3,
            batch_size=4,
            crop=64,
            device="cpu",
        )
    )
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert 0.0 <= result["best_val_mean_iou"] <= 1.0
    model, meta = load_checkpoint(out.read_bytes(), str(out))
    assert meta.arch == "unet_tiny" and meta.class_names == CLASS_NAMES and meta.stride == 16
    assert not model.training
