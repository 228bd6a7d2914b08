"""A TIFF input (GeoTIFF, COG, BigTIFF, tiled or striped) opened for windowed reads: never decoded whole.

rasterio (GDAL) reads it rather than tifffile: GDAL decodes only the blocks a window touches, knows every
TIFF flavour and compression, reads CRS, geotransform, nodata and masks, and its overviews make a statistics
pass cheap on a COG; the same library writes the georeferenced masks and traces their polygons. Object
storage is read through the job's fsspec filesystem (rasterio's ``opener``), so a window costs a few range
requests, with the credentials and client the job already has.

Each window comes out as the model wants it: three bands (``input.bands``, gray repeated, a colour map
applied), scaled to 0..255 per band (``input.scale``), with a validity mask for pixels without data.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import rasterio
from fsspec.implementations.local import LocalFileSystem
from rasterio.enums import MaskFlags
from rasterio.env import set_gdal_config
from rasterio.io import MemoryFile
from rasterio.windows import Window as RioWindow

from pipeline.geo.georef import Georef

if TYPE_CHECKING:
    from pipeline.config import InputConfig

RASTER_SUFFIXES = (".tif", ".tiff")
STATS_SIDE = 1024  # the longer side of the decimated read that percentiles and min/max come from
RANGE_BLOCK = 1 << 20  # bytes an object-store read fetches at a time: about a few compressed 512² blocks

# GDAL keeps decoded blocks in a cache of 5 % of RAM by default (1.2 GB here): bounded small instead, since
# windows are read row by row and only the blocks of one row of windows are read again.
set_gdal_config("GDAL_CACHEMAX", 128 << 20)


def is_raster(path: str) -> bool:
    return path.lower().endswith(RASTER_SUFFIXES)


def is_tiff(data: bytes) -> bool:
    return data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


@dataclass(frozen=True)
class RasterFile:
    """An input image left where it is, to be read by ranges: a TIFF is not fetched whole."""

    fs: fsspec.AbstractFileSystem
    path: str


class RasterImage:
    """One TIFF, read window by window as three 8-bit bands with a mask of valid pixels."""

    def __init__(self, source: RasterFile | bytes, cfg: InputConfig) -> None:
        # A GDAL dataset is not to be read from two threads at once: after setup every read runs on this one
        # thread, which also reads the next band of rows while the model works on this one (``prefetch``).
        self._io = ThreadPoolExecutor(1, thread_name_prefix="segpipe-raster")
        self._ahead: dict[tuple[int, int], Future[np.ndarray]] = {}
        self._memory = MemoryFile(source) if isinstance(source, bytes) else None
        self.ds = self._memory.open() if self._memory else _open(source)
        try:
            self._setup(cfg)
        except Exception:
            self.close()
            raise

    def _setup(self, cfg: InputConfig) -> None:
        ds = self.ds
        self.bands = _bands(cfg.bands, ds.count)
        self.colormap = _colormap(ds) if len(self.bands) == 1 and not cfg.bands else None
        self.col, self.row, self.width, self.height = _clip(cfg.window or _bounds_window(ds, cfg.bounds), ds)
        self.georef = _georef(ds)
        if self.georef is not None:
            self.georef = self.georef.shifted(self.row, self.col)
        self.nodata = cfg.nodata
        self.has_mask = cfg.nodata is not None or any(
            MaskFlags.all_valid not in ds.mask_flag_enums[b - 1] for b in self.bands
        )
        self.lo, self.hi = self._scaling(cfg)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The h x w x 3 uint8 pixels whose top-left is (``y``, ``x``) of the (windowed) image."""
        return self._io.submit(self._read, y, x, h, w).result()

    def rows(self, y: int, h: int) -> np.ndarray:
        """Rows [y, y + h) across the width, h x width x 3 uint8; already read if ``prefetch`` asked for them."""
        future = self._ahead.pop((y, h), None) or self._io.submit(self._read, y, 0, h, self.width)
        return future.result()

    def prefetch(self, y: int, h: int) -> None:
        """Start reading rows [y, y + h) in the background, for ``rows``."""
        if (y, h) not in self._ahead:
            self._ahead[(y, h)] = self._io.submit(self._read, y, 0, h, self.width)

    def valid(self, y: int, h: int) -> np.ndarray | None:
        """Which pixels of rows [y, y + h) hold data (a pixel is nodata when every band read is); None when all do."""
        return self._io.submit(self._valid, y, h).result() if self.has_mask else None

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)
        self._ahead.clear()
        self.ds.close()
        if self._memory is not None:
            self._memory.close()

    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        data = self.ds.read(self.bands, window=self._window(y, x, h, w))
        if self.colormap is not None:
            return self.colormap[data[0]]
        scaled = _scale(data, self.lo, self.hi)
        if len(scaled) == 1:
            scaled = np.repeat(scaled, 3, axis=0)
        return np.ascontiguousarray(scaled.transpose(1, 2, 0))

    def _valid(self, y: int, h: int, out_shape: tuple[int, int] | None = None, data: np.ndarray | None = None):
        """Rows [y, y + h) with data, at ``out_shape`` when decimated; ``data``: those rows' values, if read."""
        window, shape = self._window(y, 0, h, self.width), out_shape and (len(self.bands), *out_shape)
        if self.nodata is not None:
            data = self.ds.read(self.bands, window=window, out_shape=shape) if data is None else data
            return np.any(data != self.nodata, axis=0)
        return np.any(self.ds.read_masks(self.bands, window=window, out_shape=shape) > 0, axis=0)

    def _window(self, y: int, x: int, h: int, w: int) -> RioWindow:
        return RioWindow(self.col + x, self.row + y, w, h)

    def _scaling(self, cfg: InputConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per band, the values mapped to 0 and 255; None when the values are used as they are (clipped)."""
        method = cfg.scale
        if method == "auto":
            method = "none" if all(self.ds.dtypes[b - 1] == "uint8" for b in self.bands) else "percentile"
        if method == "none" or self.colormap is not None:
            return None, None
        if method == "fixed":
            lo, hi = cfg.scale_range
            return np.full(len(self.bands), lo), np.full(len(self.bands), hi)
        sample = self._sample()
        if method == "minmax":
            bounds = [(b.min(), b.max()) if b.size else (0.0, 1.0) for b in sample]
        else:
            bounds = [tuple(np.percentile(b, cfg.percentiles)) if b.size else (0.0, 1.0) for b in sample]
        return np.array([b[0] for b in bounds], float), np.array([b[1] for b in bounds], float)

    def _sample(self) -> list[np.ndarray]:
        """Each band's valid values in a read of the image decimated to at most STATS_SIDE a side (from the
        overviews when the file has them: a COG's statistics cost a few small reads)."""
        factor = max(1, -(-max(self.width, self.height) // STATS_SIDE))
        shape = (max(1, self.height // factor), max(1, self.width // factor))
        window = self._window(0, 0, self.height, self.width)
        data = self.ds.read(self.bands, window=window, out_shape=(len(self.bands), *shape))
        valid = self._valid(0, self.height, shape, data) if self.has_mask else np.ones(shape, bool)
        return [band[valid].astype(np.float64) for band in data]


def read_whole(source: RasterFile | bytes, cfg: InputConfig, max_pixels: int | None = None) -> np.ndarray:
    """The whole TIFF as the job reads its windows (bands, scaling, window), for what needs an image whole (a
    training sample, a report thumbnail); ValueError above ``max_pixels``."""
    raster = RasterImage(source, cfg)
    try:
        if max_pixels is not None and raster.height * raster.width > max_pixels:
            raise ValueError(f"a {raster.width}x{raster.height} TIFF is not decoded whole (above {max_pixels:,} px)")
        return raster.read(0, 0, *raster.shape)
    finally:
        raster.close()


def _open(source: RasterFile) -> rasterio.io.DatasetReader:
    fs = source.fs
    if isinstance(fs, LocalFileSystem):
        return rasterio.open(source.path)  # GDAL's own file access is the fastest on a local disk

    def opener(path: str, mode: str = "rb"):
        if path != source.path:  # GDAL's probes for side-car files (.ovr, .aux.xml, .msk): this file alone is
            raise FileNotFoundError(path)  # served, with no request spent on them
        return fs.open(path, mode, block_size=RANGE_BLOCK, cache_type="readahead")

    return rasterio.open(source.path, opener=opener)


def _bands(asked: list[int] | None, count: int) -> list[int]:
    bands = asked or ([1, 2, 3] if count >= 3 else [1])
    missing = [b for b in bands if b > count]
    if missing:
        raise ValueError(f"input.bands asks for band {missing[0]}, but the image has {count} bands")
    return bands


def _colormap(ds: rasterio.io.DatasetReader) -> np.ndarray | None:
    """A one-band palette image's colour map as a 256 x 3 lookup table, or None."""
    if ds.dtypes[0] != "uint8":
        return None
    try:
        cmap = ds.colormap(1)
    except ValueError:  # no colour map
        return None
    table = np.zeros((256, 3), np.uint8)
    for index, rgba in cmap.items():
        table[index] = rgba[:3]
    return table


def _georef(ds: rasterio.io.DatasetReader) -> Georef | None:
    if ds.crs is None:
        return None
    epsg = ds.crs.to_epsg()
    crs = f"EPSG:{epsg}" if epsg else ds.crs.to_wkt()
    return Georef(crs, tuple(ds.transform)[:6])


def _clip(window: tuple[int, int, int, int] | None, ds: rasterio.io.DatasetReader) -> tuple[int, int, int, int]:
    """(col, row, width, height) of ``window`` within the image; the whole image without one."""
    if window is None:
        return 0, 0, ds.width, ds.height
    col, row, w, h = window
    top, left = max(row, 0), max(col, 0)
    right, bottom = min(col + w, ds.width), min(row + h, ds.height)
    if left >= right or top >= bottom:
        raise ValueError(f"the input's window {list(window)} lies outside this {ds.width}x{ds.height} image")
    return left, top, right - left, bottom - top


def _bounds_window(ds: rasterio.io.DatasetReader, bounds: tuple[float, ...] | None) -> tuple[int, ...] | None:
    """The pixel window covering ``input.bounds`` (in the image's CRS), rounded outwards; None without bounds."""
    if bounds is None:
        return None
    if ds.crs is None:
        raise ValueError("input.bounds is set, but this image has no CRS")
    left, bottom, right, top = ds.bounds
    if bounds[0] >= right or bounds[2] <= left or bounds[1] >= top or bounds[3] <= bottom:
        raise ValueError(f"input.bounds {list(bounds)} do not overlap this image's {[left, bottom, right, top]}")
    window = ds.window(*bounds)
    col, row = math.floor(window.col_off), math.floor(window.row_off)
    return col, row, math.ceil(window.col_off + window.width) - col, math.ceil(window.row_off + window.height) - row


def _scale(data: np.ndarray, lo: np.ndarray | None, hi: np.ndarray | None) -> np.ndarray:
    """[bands, h, w] values to uint8: (v - lo) / (hi - lo) * 255 per band, or clipped when there is no range."""
    if lo is None:
        return data if data.dtype == np.uint8 else np.clip(data, 0, 255).astype(np.uint8)
    span = np.maximum(hi - lo, np.finfo(np.float32).tiny)[:, None, None].astype(np.float32)
    out = (data.astype(np.float32) - lo[:, None, None].astype(np.float32)) * (255.0 / span)
    return np.clip(out, 0, 255, out=out).round().astype(np.uint8)
