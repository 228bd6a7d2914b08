"""A TIFF segmented window by window: what the shard processor hands the predictor for it, and when it cannot.

Every TIFF input (a file left in place, or TIFF bytes from a tar or Parquet shard) goes this way, never decoded
whole: the predictor reads its windows (``crop``) and gives its finished mask rows to its outputs (``sink``).
"""

from __future__ import annotations

import numpy as np

from pipeline.geo.raster import RasterFile, RasterImage, is_tiff
from pipeline.image_outputs import Finished, ImageOutputs
from pipeline.images import memory_limit_bytes
from pipeline.inference.windows import Window
from pipeline.outputs import ErrorKind


class WindowedTiff:
    """A TIFF read window by window (a ``WindowedImage``), its finished rows going to its outputs."""

    def __init__(self, raster: RasterImage, outputs: ImageOutputs, mask_path: str, rows: list[list[Window]]) -> None:
        self.raster, self.outputs, self.mask_path = raster, outputs, mask_path
        self.shape = raster.shape
        starts = [(row[0].y, row[0].h) for row in rows]  # the rows of windows, in the predictor's order
        self._next = dict(zip(starts, starts[1:], strict=False))
        self._band: tuple[tuple[int, int], np.ndarray] | None = None  # the band of rows being cropped

    def crop(self, window: Window) -> np.ndarray:
        """A window cut from its row of windows' band, read across the width once (overlapping windows share
        it); the next band is read meanwhile."""
        key = (window.y, window.h)
        if self._band is None or self._band[0] != key:
            self._band = key, self.raster.rows(*key)
            if key in self._next:
                self.raster.prefetch(*self._next[key])
        return self._band[1][:, window.x : window.x + window.w]

    @property
    def sink(self) -> ImageOutputs:
        return self.outputs

    def finish(self) -> Finished:
        self._band = None
        try:
            return self.outputs.finish()
        finally:
            self.raster.close()

    def discard(self) -> None:
        self._band = None
        self.outputs.discard()
        self.raster.close()


def is_windowed(image: bytes | RasterFile | None) -> bool:
    """Read by windows: a TIFF file left in place, or TIFF bytes (a tar member, a Parquet cell)."""
    return isinstance(image, RasterFile) or (isinstance(image, bytes) and is_tiff(image))


def open_error(image: bytes | RasterFile, error: Exception) -> tuple[str, ErrorKind]:
    """The error row's reason for a TIFF that could not be opened."""
    if isinstance(image, RasterFile) and not image.fs.exists(image.path):
        return "missing file: the image was listed but could not be read", ErrorKind.INPUT
    text = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return f"cannot read TIFF: {text}", ErrorKind.INPUT


def band_too_large(width: int, rows: int, num_classes: int) -> str | None:
    """Why a row of windows (``rows`` high) across ``width`` pixels cannot be merged in this process's memory,
    or None: the merge holds fp32 probabilities and weights across the whole width, plus the pixels read and
    the finished rows."""
    need = rows * width * (4 * num_classes + 4 + 3 + 1)
    if need <= memory_limit_bytes() // 4:
        return None
    return (
        f"image is {width} pixels wide: a row of windows would need {need / 2**30:.1f} GiB "
        f"(a quarter of this process's memory at most); segment a narrower input.window"
    )
