"""The benchmark's workload: JPEG images of one size and a checkpoint of the model, built once and reused."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from pipeline.models.checkpoint import default_meta, save_checkpoint
from pipeline.synthetic import generate_sample

NUM_CLASSES = 21  # VOC's: the size of the classifier the published models have


@dataclass(frozen=True)
class Workload:
    images: str  # folder (or object-store prefix) of <count> JPEGs, size x size
    checkpoint: str
    model: str
    size: int
    count: int
    batch_size: int
    actors: int
    device: str
    precision: str
    storage: dict | None = None  # the job config's storage section, for images on an object store

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        return cls(**json.loads(text))


def build(root: Path, model: str, size: int, count: int, **settings) -> Workload:
    """Images from the procedural dataset resized to ``size``, and a checkpoint of ``model`` with random weights
    (throughput does not depend on the weights' values, and nothing can be downloaded here)."""
    images = root / f"images-{size}-{count}"
    if not images.is_dir() or len(list(images.glob("*.jpg"))) != count:
        images.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, _ = generate_sample(2026, i)
            buf = io.BytesIO()
            img.resize((size, size), Image.BILINEAR).save(buf, format="JPEG", quality=90)
            (images / f"img_{i:06d}.jpg").write_bytes(buf.getvalue())
    return Workload(str(images), str(build_checkpoint(root, model)), model, size, count, **settings)


def build_checkpoint(root: Path, model: str) -> Path:
    """A checkpoint of ``model`` with NUM_CLASSES classes and random weights (seed 0), written once."""
    checkpoint = root / f"{model}-{NUM_CLASSES}.pt"
    if not checkpoint.exists():
        import torch

        from pipeline.models import get_model

        root.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        meta = default_meta(model, [f"class_{i}" for i in range(NUM_CLASSES)])
        checkpoint.write_bytes(save_checkpoint(get_model(model, num_classes=NUM_CLASSES), meta))
    return checkpoint
