"""The report's gallery: each of the worst images as thumbnails of the image, its ground truth, the prediction
and the error map, read from the run's outputs, its input and its labels.

An image inside a tar or Parquet shard is not fetched (that would read the shard): its tile shows the masks
alone. Labels are read as the run read them: loose files by id, or COCO entries; labels carried inside the
shards are not shown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from rasterio.io import MemoryFile

from pipeline.config import InputConfig, LabelsConfig
from pipeline.geo.mask_files import decode_mask, read_mask_thumbnail
from pipeline.geo.raster import RasterFile, is_raster, is_tiff, read_whole
from pipeline.images import decode_rgb
from pipeline.labels.reader import LabelReader
from pipeline.report.overlays import blend, encode, error_map, overlay_jpeg, thumbnail
from pipeline.report.run_data import Shown
from pipeline.sources import Sample, get_layout

log = logging.getLogger(__name__)

THUMB = 192  # longest side of a gallery thumbnail, pixels
GALLERY_RASTER_PIXELS = 50_000_000  # a larger TIFF's tile shows its mask alone


@dataclass(frozen=True)
class Tile:
    shown: Shown
    pictures: dict[str, bytes]  # "image", "truth", "prediction", "errors" (PNG), those that could be drawn
    note: str = ""  # why a picture is missing


class Gallery:
    """Draws tiles for one run. ``resolve(uri) -> (fs, path)`` reads its input and labels (the job's storage
    settings); ``config`` is the run's config as its manifest records it."""

    def __init__(self, resolve, config: dict, palette: np.ndarray) -> None:
        self.resolve = resolve
        self.palette = palette
        self.layout = get_layout(config.get("input", {}).get("layout", "files"))
        self.input = InputConfig(**config.get("input", {}))
        labels_uri = config.get("labels_uri")
        self.labels = None
        if labels_uri:
            try:
                self.labels = LabelReader(LabelsConfig(**config.get("labels", {})), resolve(labels_uri), "files")
            except Exception as e:  # a label file gone since the run: the gallery goes on without ground truth
                log.warning("report: labels %s cannot be read (%s); the gallery shows no ground truth", labels_uri, e)

    def tile(self, shown: Shown, opacity: float = 0.5) -> Tile:
        notes = []
        prediction, whole = self._prediction(shown, notes)
        image = self._image(shown, notes) if whole else None
        truth = self._truth(shown, prediction.shape, notes) if whole else None
        pictures = {}
        if image is not None:
            pictures["image"] = encode(thumbnail(image, THUMB))
        if truth is not None:
            pictures["truth"] = encode(thumbnail(self.palette[truth], THUMB, nearest=True))
        overlay = blend(image, prediction, self.palette, opacity) if image is not None else self.palette[prediction]
        pictures["prediction"] = encode(thumbnail(overlay, THUMB, nearest=image is None))
        if truth is not None:
            pictures["errors"] = encode(thumbnail(error_map(image, truth, prediction), THUMB, nearest=True))
        return Tile(shown, pictures, "; ".join(notes))

    def overlay(self, shown: Shown, opacity: float) -> bytes | None:
        """The image blended with its mask as a JPEG; None for an image inside a shard."""
        image = self.image(shown)
        if image is None:
            return None
        return overlay_jpeg(image, decode_mask(self._read(shown.mask_uri)), self.palette, opacity)

    def image(self, shown: Shown) -> np.ndarray | None:
        """The image itself, when it is a file of its own (the overlays of the gallery use it too); a TIFF as
        the run read it (bands, scaling, window), unless it is too large to decode whole for a thumbnail."""
        if "#" in shown.source_uri:
            return None
        if not is_raster(shown.source_uri):
            return decode_rgb(self._read(shown.source_uri))
        return read_whole(RasterFile(*self.resolve(shown.source_uri)), self.input, GALLERY_RASTER_PIXELS)

    def _prediction(self, shown: Shown, notes: list[str]) -> tuple[np.ndarray, bool]:
        """The mask, and whether it is whole: a huge one (a GeoTIFF's) is a thumbnail from its overviews,
        shown alone."""
        data = self._read(shown.mask_uri)
        if not is_tiff(data):
            return decode_mask(data), True
        with MemoryFile(data) as memory, memory.open() as ds:
            huge = ds.width * ds.height > GALLERY_RASTER_PIXELS
        if huge:
            notes.append("a huge mask: its thumbnail alone, read from its overviews")
            return read_mask_thumbnail(data, THUMB), False
        return decode_mask(data), True

    def _image(self, shown: Shown, notes: list[str]) -> np.ndarray | None:
        try:
            image = self.image(shown)
        except Exception as e:  # gone or unreadable since the run
            notes.append(f"image unreadable: {e}")
            return None
        if image is None:
            notes.append("image inside a shard: not fetched")
        return image

    def _truth(self, shown: Shown, shape: tuple[int, int], notes: list[str]) -> np.ndarray | None:
        if self.labels is None or shown.mean_iou is None:
            return None
        sample = Sample(shown.image_id, self.layout.sample_name(shown.image_id), "", None)
        try:
            payload, _ = self.labels.fetch(sample)
            return None if payload is None else self.labels.to_mask(payload, *shape)
        except Exception as e:
            notes.append(f"label unreadable: {e}")
            return None

    def _read(self, uri: str) -> bytes:
        fs, path = self.resolve(uri)
        return fs.cat_file(path)
