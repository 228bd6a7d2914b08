"""One shard, start to commit: stream samples, decode, predict, encode, write masks, then the stats part last.

``ShardProcessor`` is a plain callable class (``__init__`` loads the model,
``__call__(shard)`` does the work), so it runs and is tested without Ray; the
Ray layer only wraps it in an actor. A shard is committed when its stats part
exists: every mask it names was written before it.

Work flows in chunks of a few batches (and a bounded number of decoded pixels):
while the model runs on one chunk, the source keeps reading the next in the
background, and two shards may run at once on one processor (a threaded actor)
with the model used by one at a time.

No image fails its shard: one that cannot be read, is too large, makes the model
raise, or (found by a careful rerun, image by image) kills the process becomes an
error row with its reason, and the shard's other rows are kept.
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
from pipeline.cpu_tuning import release_freed_memory
from pipeline.geo.georef import Georef
from pipeline.geo.mask_files import mask_suffix, open_mask_writer
from pipeline.geo.raster import RasterImage
from pipeline.geo.vectors import Polygonizer, VectorPartWriter
from pipeline.image_outputs import Finished, ImageOutputs
from pipeline.images import (
    DecodeError,
    ImageTooLarge,
    decode_rgb,
    default_max_image_pixels,
    image_pixels,
)
from pipeline.inference.plan import plan_inference
from pipeline.inference.predictor import Failure, Prediction, Predictor
from pipeline.labels import LabelError, validate_label
from pipeline.labels.reader import LabelReader
from pipeline.models.loading import load_model
from pipeline.outputs import (
    ErrorKind,
    ImageRow,
    mask_path,
    overlay_path,
    stats_path,
    unsafe_image_id,
    vectors_path,
)
from pipeline.outputs.plan import PlanReader
from pipeline.outputs.progress import clear_segmenting, mark_segmenting
from pipeline.outputs.totals import Totals, write_stats
from pipeline.palette import mask_to_png
from pipeline.report.overlays import overlay_jpeg
from pipeline.sources import Sample, Shard
from pipeline.sources.layout import InputSource
from pipeline.sources.prefetch import background
from pipeline.stats import ImageStatsAccumulator
from pipeline.windowed import WindowedTiff, band_too_large, is_windowed, open_error

log = logging.getLogger(__name__)

PROCESS_DIED = "the model process died while segmenting this image"
LARGE_IMAGE_BYTES = 48 << 20  # a decoded image this large (16 Mpx) gives its decode buffers back at once


@dataclass(frozen=True, slots=True)
class ShardSummary:
    shard_id: str
    images: int
    errors: int
    labeled: int
    seconds: float
    node: str = "local"  # the Ray node id it ran on; "local" outside Ray
    totals: Totals | None = None  # its rows summed (None once the driver has folded them into the run's)


class ShardResults(list):
    """Shard summaries in completion order as the driver keeps them: each without its totals, which are summed
    into ``totals`` as it arrives (a few KB a shard would be gigabytes over a million shards)."""

    def __init__(self) -> None:
        super().__init__()
        self.totals: Totals | None = None

    def add(self, summary: ShardSummary) -> None:
        if summary.totals is not None:
            if self.totals is None:
                self.totals = Totals(summary.totals.num_classes)
            self.totals += summary.totals
        self.append(replace(summary, totals=None))


@dataclass
class _Prepared:
    sample: Sample
    image: np.ndarray | WindowedTiff | None  # decoded RGB, a TIFF read by windows, or None with ``error`` and ``kind``
    error: str | None
    kind: ErrorKind | None = None
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
        loaded = load_model(cfg)
        model, self.meta = loaded.model, loaded.meta
        self.plan = plan_inference(cfg.inference, self.meta)
        self.predictor = Predictor(
            model,
            self.meta,
            device=cfg.device,
            batch_size=cfg.batch_size,
            precision=cfg.precision,
            channels_last=cfg.channels_last,
            plan=self.plan,
        )
        self.model_lock = threading.Lock()  # shards may share this processor; the model runs one batch at a time
        self.palette = self.meta.palette_array()
        self.source = InputSource(*cfg.resolve(cfg.input_uri), cfg.input)
        self.labels = LabelReader(
            cfg.labels, cfg.resolve(cfg.labels_uri) if cfg.labels_uri else None, self.source.layout
        )
        self.out_fs, self.out_root = cfg.resolve(cfg.output_uri)
        self.plan_file = PlanReader(self.out_fs, self.out_root)
        self.pool = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="segpipe-io")
        self.max_pixels = cfg.max_image_pixels or default_max_image_pixels()
        # Enough images per chunk to fill a few batches and keep every IO thread busy, but no more decoded
        # pixels than that many tiles: a chunk of large images holds one or two of them.
        self.chunk = max(2 * cfg.batch_size, cfg.io_threads)
        self.chunk_pixels = self.chunk * self.plan.tile[0] * self.plan.tile[1]
        self.vectors = cfg.outputs.vectors

    def __call__(self, shard: Shard, careful: bool = False, killers: frozenset[str] = frozenset()) -> ShardSummary:
        """Segment ``shard`` and commit it. ``careful``: image by image, noting each image before it is touched
        (the rerun of a shard whose process died); ``killers``: images that killed it, now error rows."""
        start = time.perf_counter()
        shard = self.plan_file.full(shard)
        rows: list[ImageRow] = []
        samples = _checked_ids(background(self.source.read(shard, self.pool), maxsize=self.chunk))
        vectors = VectorPartWriter(self.out_fs, vectors_path(self.out_root, shard.shard_id)) if self.vectors else None
        try:
            if careful:
                rows = [self._carefully(shard, sample, killers, vectors) for sample in samples]
                clear_segmenting(self.out_fs, self.out_root, shard.shard_id)
            else:
                for chunk in _chunks(samples, self.chunk, self.chunk_pixels):
                    rows.extend(self._process(shard, chunk, vectors))
            if vectors is not None:
                vectors.close()  # before the stats part: a committed shard's polygons are there
        except BaseException:
            if vectors is not None:
                vectors.discard()
            raise
        part = stats_path(self.out_root, shard.shard_id)
        totals = write_stats(self.out_fs, part, rows, self.run_id, shard.sources(), self.meta.num_classes)
        return ShardSummary(
            shard_id=shard.shard_id,
            images=len(rows),
            errors=sum(r.error is not None for r in rows),
            labeled=sum(r.labeled for r in rows),
            seconds=time.perf_counter() - start,
            node=self.node,
            totals=totals,
        )

    def model_rate(self, samples: Iterable[Sample], seconds: float) -> float:
        """Images per second of the model on ``samples``, decoded once (a TIFF: read by windows each time) and
        predicted again and again for about ``seconds`` after one warm-up pass; nothing written (what
        ``segpipe plan --estimate`` times)."""
        prepared = [
            self._prepare_windowed(s, write=False) if is_windowed(s.image) else self._prepare(s) for s in samples
        ]
        images = [p.image for p in prepared if p.image is not None]
        try:
            if not images:
                return 0.0
            self.predictor.predict(images)
            done, start = 0, time.perf_counter()
            while done == 0 or time.perf_counter() - start < seconds:
                self.predictor.predict(images)
                done += len(images)
            return done / (time.perf_counter() - start)
        finally:
            for image in images:
                if isinstance(image, WindowedTiff):
                    image.discard()

    def _carefully(
        self, shard: Shard, sample: Sample, killers: frozenset[str], vectors: VectorPartWriter | None
    ) -> ImageRow:
        if sample.image_id in killers:
            return self._row(shard, _Prepared(sample, None, PROCESS_DIED, ErrorKind.PROCESS_DIED), None, vectors)
        mark_segmenting(self.out_fs, self.out_root, shard.shard_id, sample.image_id)
        return self._process(shard, [sample], vectors)[0]

    def _process(self, shard: Shard, chunk: list[Sample], vectors: VectorPartWriter | None) -> list[ImageRow]:
        prepared = list(self.pool.map(self._prepare, chunk))
        ok = [p for p in prepared if p.image is not None]
        with self.model_lock:
            preds = self.predictor.predict([p.image for p in ok])
        by_id = {id(p): pred for p, pred in zip(ok, preds, strict=True)}
        if self.cfg.outputs.overlays != "all":  # else the overlay needs the pixels: _row drops them
            for p in ok:
                if isinstance(p.image, np.ndarray):
                    p.image = None  # the rows need only the masks: a large image's pixels go before its PNG
        return list(self.pool.map(lambda p: self._row(shard, p, by_id.get(id(p)), vectors), prepared))

    def _prepare(self, sample: Sample) -> _Prepared:
        """Decode the image and fetch its label's payload (IO threads)."""
        if sample.error is not None:
            return _Prepared(sample, None, sample.error, ErrorKind.INPUT)
        if is_windowed(sample.image):
            return self._prepare_windowed(sample)
        image, error, kind = self._decode(sample.image)
        if image is None:
            return _Prepared(sample, None, error, kind)
        try:
            return _Prepared(sample, image, None, None, *self.labels.fetch(sample))
        except LabelError as e:
            return _Prepared(sample, image, None, label_error=f"label: {e}")

    def _prepare_windowed(self, sample: Sample, write: bool = True) -> _Prepared:
        """Open a TIFF for windowed reads and set up its outputs, which take its mask band by band: the label
        is converted first (statistics are counted as rows finish). ``write=False``: outputs that only count
        (the model timed by ``model_rate``)."""
        try:
            raster = RasterImage(sample.image, self.cfg.input)
        except Exception as e:  # noqa: BLE001 - whatever GDAL says of a file is the row's reason
            return _Prepared(sample, None, *open_error(sample.image, e))
        too_large = band_too_large(raster.width, min(self.plan.tile[0], raster.height), self.meta.num_classes)
        if too_large:
            raster.close()
            return _Prepared(sample, None, too_large, ErrorKind.TOO_LARGE)
        label, label_uri, label_error = self._windowed_label(sample, *raster.shape)
        image_id, georef, (h, w) = sample.image_id, raster.georef, raster.shape
        fmt = self._mask_format(georef)
        out = mask_path(self.out_root, image_id, mask_suffix(fmt))
        writer, polygons = None, None
        if write:
            writer = open_mask_writer(fmt, self.out_fs, out, h, w, self.palette, georef, self.cfg.png_compress_level)
            polygons = self._polygons(h, w, georef)
        outputs = ImageOutputs(writer, self._stats(label), label, polygons, raster.valid)
        windowed = WindowedTiff(raster, outputs, out, self.plan.windows(h, w))
        return _Prepared(sample, windowed, None, label_uri=label_uri, label_error=label_error)

    def _windowed_label(self, sample: Sample, h: int, w: int) -> tuple[np.ndarray | None, str | None, str | None]:
        """A windowed image's label as a whole mask (1 byte a pixel), converted and checked before the image
        is segmented: (label, its URI, why it cannot be used)."""
        try:
            payload, label_uri = self.labels.fetch(sample)
        except LabelError as e:
            return None, None, f"label: {e}"
        if payload is None:
            return None, label_uri, None
        if h * w > self.max_pixels:
            return None, label_uri, f"label: {w}x{h} pixels is above max_image_pixels: it is converted whole"
        label, error = self._label(payload, h, w)
        return label, label_uri, error

    def _label(self, payload: object, h: int, w: int) -> tuple[np.ndarray | None, str | None]:
        """The label converted to class indices and checked against the image: (label, None) or (None, why)."""
        try:
            label = self.labels.to_mask(payload, h, w)
            validate_label(label, h, w, self.meta.num_classes)
        except LabelError as e:
            return None, f"label: {e}"
        return label, None

    def _mask_format(self, georef: Georef | None) -> str:
        fmt = self.cfg.outputs.mask_format
        return ("geotiff" if georef is not None else "png") if fmt == "auto" else fmt

    def _stats(self, label: np.ndarray | None) -> ImageStatsAccumulator:
        return ImageStatsAccumulator(self.meta.num_classes, label is not None)

    def _polygons(self, h: int, w: int, georef: Georef | None) -> Polygonizer | None:
        return Polygonizer(h, w, georef, self.cfg.outputs.vector_tolerance) if self.vectors else None

    def _decode(self, data: bytes | None) -> tuple[np.ndarray | None, str | None, ErrorKind | None]:
        if data is None:
            return None, "missing file: the image was listed but could not be read", ErrorKind.INPUT
        try:
            image = decode_rgb(data, self.max_pixels)
            if image.size > LARGE_IMAGE_BYTES:
                release_freed_memory()
            return image, None, None
        except ImageTooLarge as e:
            return None, str(e), ErrorKind.TOO_LARGE
        except DecodeError as e:
            return None, str(e), ErrorKind.INPUT

    def _row(
        self, shard: Shard, p: _Prepared, pred: Prediction | Failure | None, vectors: VectorPartWriter | None
    ) -> ImageRow:
        """Finish the image's outputs (mask file, statistics, polygons) and build its stats row."""
        sample = p.sample
        ids = {"run_id": self.run_id, "image_id": sample.image_id, "source_uri": sample.source_uri}
        ids |= {"shard_id": shard.shard_id, "model": self.cfg.model, "increment": shard.increment}
        windowed = p.image if isinstance(p.image, WindowedTiff) else None
        if windowed is not None and not isinstance(pred, Prediction):
            windowed.discard()
        if isinstance(pred, Failure):
            log.warning("shard %s, image %s: %s", shard.shard_id, sample.image_id, pred.reason)
            return ImageRow.failed(**ids, error=pred.reason, error_kind=ErrorKind(pred.kind))
        if pred is None:  # the image itself could not be read, decoded or segmented
            return ImageRow.failed(**ids, error=p.error, error_kind=p.kind)
        if windowed is not None:
            out, georef, (h, w), label_error = windowed.mask_path, windowed.raster.georef, windowed.shape, p.label_error
            finished = windowed.finish()
        else:
            georef, (h, w) = None, pred.mask.shape
            out, finished, label_error = self._whole_outputs(sample, p, pred)
        if vectors is not None and finished.vectors is not None:
            vectors.add(sample.image_id, finished.vectors, georef, self.meta.class_names)
        return ImageRow(
            **ids,
            **finished.stats.columns(),
            width=w,
            height=h,
            mask_uri=storage.to_uri(self.out_fs, out),
            mean_confidence=pred.mean_confidence,
            label_uri=p.label_uri,
            error=label_error,
            error_kind=ErrorKind.LABEL if label_error else None,
            crs=georef.crs if georef else None,
            bounds=dict(zip(("xmin", "ymin", "xmax", "ymax"), georef.bounds(h, w), strict=True)) if georef else None,
        )

    def _whole_outputs(self, sample: Sample, p: _Prepared, pred: Prediction) -> tuple[str, Finished, str | None]:
        """An image decoded whole: convert and check its label, write its mask (and overlay) and count it.
        Returns the mask's path, the finished outputs and why the label cannot be used."""
        h, w = pred.mask.shape
        label, label_error = self._label(p.label, h, w) if p.label is not None else (None, p.label_error)
        fmt = self._mask_format(None)
        out = mask_path(self.out_root, sample.image_id, mask_suffix(fmt))
        writer = None
        if fmt == "png":  # whole, at once: the fast path of every ordinary image
            storage.write_bytes(self.out_fs, out, mask_to_png(pred.mask, self.palette, self.cfg.png_compress_level))
        else:
            writer = open_mask_writer(fmt, self.out_fs, out, h, w, self.palette, None, self.cfg.png_compress_level)
        outputs = ImageOutputs(writer, self._stats(label), label, self._polygons(h, w, None))
        outputs.add(0, pred.mask)
        if p.image is not None:  # outputs.overlays: all
            overlay = overlay_jpeg(p.image, pred.mask, self.palette, self.cfg.outputs.overlay_opacity)
            p.image = None
            storage.write_bytes(self.out_fs, overlay_path(self.out_root, sample.image_id), overlay)
        return out, outputs.finish(), label_error


def _ray_node_id() -> str:
    """The id of the Ray node this process runs on, or "local" when it is not part of a Ray cluster.
    Ray is looked up, not imported: a processor outside Ray must not pay for (or need) the import."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return "local"
    return ray.get_runtime_context().get_node_id()


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


def _chunks(samples: Iterable[Sample], size: int, pixels: int) -> Iterator[list[Sample]]:
    """Groups of at most ``size`` samples and (unless one alone is larger) ``pixels`` pixels, read from the
    images' headers, so that a chunk of large images does not decode them all at once (a TIFF is never decoded
    whole: it counts for nothing)."""
    chunk: list[Sample] = []
    held = 0
    for sample in samples:
        n = 0 if sample.image is None or is_windowed(sample.image) else (image_pixels(sample.image) or 0)
        if chunk and (len(chunk) == size or held + n > pixels):
            yield chunk
            chunk, held = [], 0
        chunk.append(sample)
        held += n
    if chunk:
        yield chunk
