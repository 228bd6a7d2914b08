"""One shard, start to commit: fetch, decode, predict, encode, write masks, then the stats part last.

``ShardProcessor`` is a plain callable class (``__init__`` loads the model,
``__call__(shard)`` does the work), so it runs and is tested without Ray; the
Ray layer only wraps it in an actor. A shard is committed when its stats part
exists: every mask it names was written before it.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline import storage
from pipeline.config import JobConfig
from pipeline.images import DecodeError, decode_rgb
from pipeline.labels import LabelError, decode_label, label_path_for, validate_label
from pipeline.models.checkpoint import load_checkpoint
from pipeline.outputs import mask_path, stats_path, write_stats
from pipeline.palette import mask_to_png
from pipeline.planning import Shard
from pipeline.predictor import Predictor
from pipeline.stats import image_stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSummary:
    shard_id: str
    images: int
    errors: int
    labeled: int
    seconds: float


def _read_optional(fs, path: str) -> bytes | None:
    """None for a missing object. Other storage errors propagate: the shard fails and is retried whole,
    rather than a passing outage being written down as a bad image."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


class ShardProcessor:
    """Holds the model resident on its device and processes whole shards."""

    def __init__(self, cfg: JobConfig, run_id: str, torch_threads: int | None = None) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.cfg = cfg
        self.run_id = run_id
        ckpt_fs, ckpt_path = cfg.resolve(cfg.checkpoint_uri)
        model, self.meta = load_checkpoint(ckpt_fs.cat_file(ckpt_path), cfg.checkpoint_uri, expect_arch=cfg.model)
        self.predictor = Predictor(
            model, self.meta, device=cfg.device, batch_size=cfg.batch_size, precision=cfg.precision
        )
        self.palette = self.meta.palette_array()
        self.in_fs, self.in_root = cfg.resolve(cfg.input_uri)
        self.out_fs, self.out_root = cfg.resolve(cfg.output_uri)
        self.lbl_fs, self.lbl_root = cfg.resolve(cfg.labels_uri) if cfg.labels_uri else (None, None)
        self.pool = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="segpipe-io")

    def __call__(self, shard: Shard) -> ShardSummary:
        start = time.perf_counter()
        items = shard.items
        raw = list(self.pool.map(lambda rel: _read_optional(self.in_fs, storage.join(self.in_root, rel)), items))
        labels_raw = (
            list(self.pool.map(lambda rel: _read_optional(self.lbl_fs, self._label_path(rel)), items))
            if self.lbl_fs
            else [None] * len(items)
        )
        decoded = list(self.pool.map(_decode_or_reason, raw))
        ok = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
        preds = dict(zip(ok, self.predictor.predict([decoded[i] for i in ok]), strict=True))
        rows = list(
            self.pool.map(lambda i: self._row(shard, i, decoded[i], preds.get(i), labels_raw[i]), range(len(items)))
        )
        write_stats(self.out_fs, stats_path(self.out_root, shard.shard_id), rows, self.run_id)
        return ShardSummary(
            shard_id=shard.shard_id,
            images=len(rows),
            errors=sum(r["error"] is not None for r in rows),
            labeled=sum(bool(r["labeled"]) for r in rows),
            seconds=time.perf_counter() - start,
        )

    def _label_path(self, rel: str) -> str:
        return storage.join(self.lbl_root, label_path_for(rel))

    def _row(self, shard: Shard, i: int, image, pred, label_bytes: bytes | None) -> dict:
        """Validate the label, write the mask, and build the image's stats row."""
        rel = shard.items[i]
        row = {
            "run_id": self.run_id,
            "image_id": rel,
            "source_uri": storage.to_uri(self.in_fs, storage.join(self.in_root, rel)),
            "shard_id": shard.shard_id,
            "model": self.cfg.model,
            "labeled": False,
        }
        if pred is None:  # the image itself could not be read or decoded
            row["error"] = image if isinstance(image, str) else "missing file"
            return row
        h, w = pred.mask.shape
        label, label_error = None, None
        if label_bytes is not None:
            row["label_uri"] = storage.to_uri(self.lbl_fs, self._label_path(rel))
            try:
                label = decode_label(label_bytes)
                validate_label(label, h, w, self.meta.num_classes)
            except LabelError as e:
                label, label_error = None, f"label: {e}"
        out = mask_path(self.out_root, rel)
        storage.write_bytes(self.out_fs, out, mask_to_png(pred.mask, self.palette, self.cfg.png_compress_level))
        row.update(image_stats(pred.mask, self.meta.num_classes, label))
        row.update(
            width=w,
            height=h,
            mask_uri=storage.to_uri(self.out_fs, out),
            mean_confidence=pred.mean_confidence,
            error=label_error,
        )
        return row


def _decode_or_reason(data: bytes | None) -> np.ndarray | str:
    if data is None:
        return "missing file: the image was listed but could not be read"
    try:
        return decode_rgb(data)
    except DecodeError as e:
        return str(e)
