"""One shard, start to commit: stream samples, decode, predict, encode, write masks, then the stats part last.

``ShardProcessor`` is a plain callable class (``__init__`` loads the model,
``__call__(shard)`` does the work), so it runs and is tested without Ray; the
Ray layer only wraps it in an actor. A shard is committed when its stats part
exists: every mask it names was written before it.

Work flows in chunks of a few batches: while the model runs on one chunk, the
source keeps reading the next in the background, and two shards may run at once
on one processor (a threaded actor) with the model used by one at a time.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from pipeline import storage
from pipeline.config import JobConfig
from pipeline.images import DecodeError, decode_rgb
from pipeline.labels import LabelError, validate_label
from pipeline.labels.reader import LabelReader
from pipeline.models.checkpoint import load_checkpoint, read_checkpoint
from pipeline.outputs import ImageRow, mask_path, stats_path, unsafe_image_id, write_stats
from pipeline.palette import mask_to_png
from pipeline.predictor import Predictor
from pipeline.sources import Sample, Shard
from pipeline.sources.layout import InputSource
from pipeline.sources.prefetch import background
from pipeline.stats import image_stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSummary:
    shard_id: str
    images: int
    errors: int
    labeled: int
    seconds: float
    node: str = "local"  # the Ray node id it ran on; "local" outside Ray


@dataclass
class _Prepared:
    sample: Sample
    image: np.ndarray | None  # decoded RGB, or None with ``error`` set
    error: str | None
    label: object | None = None  # the label's payload (bytes or a COCO entry), not yet converted
    label_uri: str | None = None
    label_error: str | None = None  # the label could not even be found unambiguously


class ShardProcessor:
    """Holds the model resident on its device and processes whole shards."""

    def __init__(self, cfg: JobConfig, run_id: str, torch_threads: int | None = None) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.cfg = cfg
        self.run_id = run_id
        self.node = _ray_node_id()
        model, self.meta = load_checkpoint(
            read_checkpoint(cfg.resolve, cfg.checkpoint_uri),
            cfg.checkpoint_uri,
            expect_arch=cfg.model,
            sha256=cfg.checkpoint_sha256,
        )
        self.predictor = Predictor(
            model,
            self.meta,
            device=cfg.device,
            batch_size=cfg.batch_size,
            precision=cfg.precision,
            channels_last=cfg.channels_last,
        )
        self.model_lock = threading.Lock()  # shards may share this processor; the model runs one batch at a time
        self.palette = self.meta.palette_array()
        self.source = InputSource(*cfg.resolve(cfg.input_uri), cfg.input)
        self.labels = LabelReader(
            cfg.labels, cfg.resolve(cfg.labels_uri) if cfg.labels_uri else None, self.source.layout
        )
        self.out_fs, self.out_root = cfg.resolve(cfg.output_uri)
        self.pool = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="segpipe-io")
        # Enough images per chunk to fill a few batches and keep every IO thread busy.
        self.chunk = max(2 * cfg.batch_size, cfg.io_threads)

    def __call__(self, shard: Shard) -> ShardSummary:
        start = time.perf_counter()
        rows: list[ImageRow] = []
        samples = _checked_ids(background(self.source.read(shard, self.pool), maxsize=self.chunk))
        for chunk in _chunks(samples, self.chunk):
            rows.extend(self._process(shard, chunk))
        write_stats(self.out_fs, stats_path(self.out_root, shard.shard_id), rows, self.run_id)
        return ShardSummary(
            shard_id=shard.shard_id,
            images=len(rows),
            errors=sum(r.error is not None for r in rows),
            labeled=sum(r.labeled for r in rows),
            seconds=time.perf_counter() - start,
            node=self.node,
        )

    def _process(self, shard: Shard, chunk: list[Sample]) -> list[ImageRow]:
        prepared = list(self.pool.map(self._prepare, chunk))
        ok = [p for p in prepared if p.image is not None]
        with self.model_lock:
            preds = self.predictor.predict([p.image for p in ok])
        by_id = {id(p): pred for p, pred in zip(ok, preds, strict=True)}
        return list(self.pool.map(lambda p: self._row(shard, p, by_id.get(id(p))), prepared))

    def _prepare(self, sample: Sample) -> _Prepared:
        """Decode the image and fetch its label's payload (IO threads)."""
        if sample.error is not None:
            return _Prepared(sample, None, sample.error)
        image, error = _decode(sample.image)
        if image is None:
            return _Prepared(sample, None, error)
        try:
            return _Prepared(sample, image, None, *self.labels.fetch(sample))
        except LabelError as e:
            return _Prepared(sample, image, None, label_error=f"label: {e}")

    def _row(self, shard: Shard, p: _Prepared, pred) -> ImageRow:
        """Convert and check the label, write the mask, and build the image's stats row."""
        sample = p.sample
        ids = {"run_id": self.run_id, "image_id": sample.image_id, "source_uri": sample.source_uri}
        ids |= {"shard_id": shard.shard_id, "model": self.cfg.model}
        if pred is None:  # the image itself could not be read or decoded
            return ImageRow.failed(**ids, error=p.error)
        h, w = pred.mask.shape
        label, label_error = None, p.label_error
        if p.label is not None:
            try:
                label = self.labels.to_mask(p.label, h, w)
                validate_label(label, h, w, self.meta.num_classes)
            except LabelError as e:
                label, label_error = None, f"label: {e}"
        out = mask_path(self.out_root, sample.image_id)
        storage.write_bytes(self.out_fs, out, mask_to_png(pred.mask, self.palette, self.cfg.png_compress_level))
        return ImageRow(
            **ids,
            **image_stats(pred.mask, self.meta.num_classes, label).columns(),
            width=w,
            height=h,
            mask_uri=storage.to_uri(self.out_fs, out),
            mean_confidence=pred.mean_confidence,
            label_uri=p.label_uri,
            error=label_error,
        )


def _ray_node_id() -> str:
    """The id of the Ray node this process runs on, or "local" when it is not part of a Ray cluster.
    Ray is looked up, not imported: a processor outside Ray must not pay for (or need) the import."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return "local"
    return ray.get_runtime_context().get_node_id()


def _decode(data: bytes | None) -> tuple[np.ndarray | None, str | None]:
    if data is None:
        return None, "missing file: the image was listed but could not be read"
    try:
        return decode_rgb(data), None
    except DecodeError as e:
        return None, str(e)


def _checked_ids(samples: Iterable[Sample]) -> Iterator[Sample]:
    """Samples whose id cannot name a mask safely become error rows: ids come from the data (tar member
    names, an id column), and one like ``../../x`` must not write outside the output, nor a repeat overwrite."""
    seen: set[str] = set()
    for sample in samples:
        reason = unsafe_image_id(sample.image_id)
        if reason is None and sample.image_id in seen:
            reason = "duplicate image id in this shard; the first one's mask was kept"
        seen.add(sample.image_id)
        yield sample if reason is None else replace(sample, image=None, label=None, error=reason)


def _chunks(items: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
