"""Mask files written row band by row band, never whole in memory, and read back.

A huge input (a GeoTIFF tens of thousands of pixels a side) has a mask too big to hold: its rows arrive band by
band, top to bottom, and go straight to a local temporary file, which is published (``storage.write_file``) on
``close``. Two formats:

- ``geotiff``: a Cloud-Optimized GeoTIFF (tiled, DEFLATE, internal overviews, the palette as the band's colour
  map, nodata 255, the source's CRS and geotransform), so a GIS opens it straight from S3 with range reads and
  zooms out through overviews. The overviews are computed by MODE: a class mask must never be averaged.
  Rows go first to a tiled GTiff, buffered to whole tile rows (512 x width bytes) so every tile is written
  once, complete; GDAL's COG driver then rewrites it with overviews in COG layout. GDAL 3.10's COG driver keeps
  the colour table, nodata and georeference (checked in tests/test_mask_files.py). In memory: that tile row,
  GDAL's block cache (GDAL_CACHE_BYTES) and the COG driver's overview chunks, whatever the mask's height.
- ``png``: a palette PNG (as ``palette.mask_to_png`` writes) streamed scanline by scanline through one zlib
  stream, for a huge non-georeferenced image: in memory only the band being written and zlib's state.
"""

from __future__ import annotations

import math
import struct
import tempfile
import warnings
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal

import fsspec
import numpy as np
import rasterio
import rasterio.shutil
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import DatasetReader, DatasetWriter, MemoryFile
from rasterio.windows import Window

from pipeline import storage
from pipeline.geo.georef import Georef
from pipeline.geo.raster import is_tiff
from pipeline.palette import IGNORE_INDEX, png_to_mask

MaskFormat = Literal["png", "geotiff"]
MASK_FORMATS: tuple[MaskFormat, ...] = ("png", "geotiff")
_SUFFIXES = {"png": ".png", "geotiff": ".tif"}

BLOCK = 512
# GDAL's block cache while a mask is written and converted: bounds memory whatever the raster's size.
GDAL_CACHE_BYTES = 16 * 2**20
WRITE_COLUMNS = 16 * BLOCK
IDAT_BYTES = 2**20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def mask_suffix(fmt: str) -> str:
    """The file suffix of a mask format: ``.png`` or ``.tif``."""
    try:
        return _SUFFIXES[fmt]
    except KeyError:
        raise ValueError(f"unknown mask format {fmt!r}; expected one of {MASK_FORMATS}") from None


class MaskWriter(ABC):
    """Takes a mask's rows in order (``write_rows``) and publishes the file on ``close``; ``discard`` drops it.
    As a context manager it closes on a clean exit and discards on an exception."""

    format: MaskFormat

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        path: str,
        height: int,
        width: int,
        palette: np.ndarray,
        georef: Georef | None = None,
        compress_level: int = 1,
    ):
        self.georef, self.compress_level = georef, compress_level  # georef: what a GeoTIFF carries (a PNG none)
        if height < 1 or width < 1:
            raise ValueError(f"a mask must have at least one pixel, got {height} x {width}")
        self.fs, self.path, self.height, self.width = fs, path, height, width
        self.palette = np.asarray(palette, dtype=np.uint8)
        if self.palette.shape != (256, 3):
            raise ValueError(f"palette must be (256, 3), got {self.palette.shape}")
        self.rows_written = 0
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(prefix="segpipe-mask-")
        self.local_path = str(Path(self._tmpdir.name) / f"mask{mask_suffix(self.format)}")
        try:
            self._start()
        except BaseException:
            self.discard()
            raise

    def write_rows(self, rows: np.ndarray) -> None:
        """Append ``rows`` (uint8, [n, width]) below those already written."""
        if self._tmpdir is None:
            raise ValueError(f"mask writer for {self.path} is already closed")
        if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"rows must be uint8 [n, {self.width}], got {rows.dtype} {rows.shape}")
        if self.rows_written + len(rows) > self.height:
            raise ValueError(f"{self.rows_written} + {len(rows)} rows exceed the mask's height {self.height}")
        self._write(np.ascontiguousarray(rows))
        self.rows_written += len(rows)

    def close(self) -> None:
        """Finish the file and publish it at ``path``; ValueError (and nothing written) if rows are missing."""
        try:
            if self.rows_written != self.height:
                raise ValueError(f"mask {self.path} got {self.rows_written} of its {self.height} rows")
            self._finish()
            storage.write_file(self.fs, self.path, self.local_path)
        finally:
            self.discard()

    def discard(self) -> None:
        """Drop the temporaries; nothing is written. Safe to call more than once."""
        if self._tmpdir is not None:
            try:
                self._release()
            finally:
                self._tmpdir.cleanup()
                self._tmpdir = None

    def __enter__(self) -> MaskWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    @abstractmethod
    def _start(self) -> None:
        """Open the local temporary file."""

    @abstractmethod
    def _write(self, rows: np.ndarray) -> None: ...

    @abstractmethod
    def _finish(self) -> None:
        """Complete ``local_path``."""

    @abstractmethod
    def _release(self) -> None:
        """Close open handles (the file may be incomplete)."""


class PngMaskWriter(MaskWriter):
    """A palette PNG (colour type 3, 8 bits) streamed: each band's scanlines (filter 0) through one zlib
    stream, flushed as an IDAT chunk whenever ~1 MB of compressed data has gathered."""

    format = "png"

    _file: BinaryIO | None = None

    def _start(self) -> None:
        self._zlib = zlib.compressobj(self.compress_level)
        self._pending = bytearray()  # compressed, not yet in an IDAT chunk
        self._file = open(self.local_path, "wb")  # closed in _release
        self._file.write(PNG_MAGIC)
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, 3, 0, 0, 0))
        self._chunk(b"PLTE", self.palette.tobytes())

    def _chunk(self, kind: bytes, data: bytes | bytearray) -> None:
        assert self._file is not None
        self._file.write(struct.pack(">I", len(data)) + kind)
        self._file.write(data)
        self._file.write(struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))))

    def _write(self, rows: np.ndarray) -> None:
        for row in rows:  # row by row, not a copy of the band with a filter column
            self._pending += self._zlib.compress(b"\x00")  # filter type 0 (None)
            self._pending += self._zlib.compress(row.data)
            if len(self._pending) >= IDAT_BYTES:
                self._chunk(b"IDAT", self._pending)
                self._pending.clear()

    def _finish(self) -> None:
        self._pending += self._zlib.flush()
        self._chunk(b"IDAT", self._pending)
        self._chunk(b"IEND", b"")
        self._release()

    def _release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CogMaskWriter(MaskWriter):
    """A Cloud-Optimized GeoTIFF, by way of a local tiled GTiff filled one whole row of 512 x 512 tiles at
    a time."""

    format = "geotiff"

    _ds: DatasetWriter | None = None

    def _start(self) -> None:
        self._band = np.empty((min(BLOCK, self.height), self.width), dtype=np.uint8)  # the tile row being filled
        self._top = self._filled = 0  # the band's first row in the mask; rows in it
        self._gtiff = str(Path(self.local_path).with_name("rows.tif"))
        profile = dict(driver="GTiff", height=self.height, width=self.width, count=1, dtype="uint8")
        profile |= dict(tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate", zlevel=1)
        if self.georef is not None:
            profile |= dict(crs=self.georef.crs, transform=self.georef.affine)
        with _gdal_env(), warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # georef None: a plain TIFF is meant
            self._ds = rasterio.open(self._gtiff, "w", nodata=IGNORE_INDEX, bigtiff="IF_SAFER", **profile)
            self._ds.write_colormap(1, {k: tuple(int(c) for c in self.palette[k]) for k in range(256)})

    def _write(self, rows: np.ndarray) -> None:
        while len(rows):
            n = min(len(rows), len(self._band) - self._filled)
            self._band[self._filled : self._filled + n] = rows[:n]
            self._filled, rows = self._filled + n, rows[n:]
            if self._filled == len(self._band) or self._top + self._filled == self.height:
                self._flush_band()

    def _flush_band(self) -> None:
        # In slices of WRITE_COLUMNS: rasterio copies the array it writes, and the band may be 100,000 wide.
        with _gdal_env():
            for col in range(0, self.width, WRITE_COLUMNS):
                rows = self._band[: self._filled, col : col + WRITE_COLUMNS]
                self._ds.write(rows, 1, window=Window(col, self._top, rows.shape[1], self._filled))
        self._top, self._filled = self._top + self._filled, 0

    def _finish(self) -> None:
        self._band = np.empty((0, 0), dtype=np.uint8)  # its 512 x width bytes are not held through the copy
        self._release()
        with _gdal_env():
            rasterio.shutil.copy(
                self._gtiff,
                self.local_path,
                driver="COG",
                compress="DEFLATE",
                level=self.compress_level,
                blocksize=BLOCK,
                overview_resampling="MODE",
                bigtiff="IF_SAFER",
            )

    def _release(self) -> None:
        if self._ds is not None and not self._ds.closed:
            with _gdal_env():
                self._ds.close()


def _gdal_env() -> rasterio.Env:
    # COG_TMP_COMPRESSION: the COG driver's temporary overview file is ZSTD (level 9) by default, whose
    # compressor state alone costs ~20 MB of memory; DEFLATE costs little and is as fast here.
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES, COG_TMP_COMPRESSION="DEFLATE")


def open_mask_writer(
    fmt: str,
    fs: fsspec.AbstractFileSystem,
    path: str,
    height: int,
    width: int,
    palette: np.ndarray,
    georef: Georef | None,
    compress_level: int = 1,
) -> MaskWriter:
    """A writer for a ``height`` x ``width`` mask at ``fs``/``path`` (ending in ``mask_suffix(fmt)``).
    ``georef`` places a GeoTIFF (None: a plain tiled TIFF); a PNG has none to carry."""
    writers = {"png": PngMaskWriter, "geotiff": CogMaskWriter}
    if fmt in writers:
        return writers[fmt](fs, path, height, width, palette, georef, compress_level)
    raise ValueError(f"unknown mask format {fmt!r}; expected one of {MASK_FORMATS}")


def decode_mask(data: bytes) -> np.ndarray:
    """A mask file's class indices (uint8 [h, w]) from its bytes: a palette PNG or a (Geo)TIFF's band 1."""
    if data.startswith(PNG_MAGIC):
        return png_to_mask(data)
    with _open_tiff(data) as ds:
        return ds.read(1)


def read_mask_thumbnail(data: bytes, max_side: int) -> np.ndarray:
    """A mask's class indices subsampled by nearest to a longer side of at most ``max_side``; a TIFF's
    overviews serve the read, a PNG is decoded and strided."""
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    if data.startswith(PNG_MAGIC):
        mask = png_to_mask(data)
        step = math.ceil(max(mask.shape) / max_side)
        return np.ascontiguousarray(mask[::step, ::step])
    with _open_tiff(data) as ds:
        step = math.ceil(max(ds.height, ds.width) / max_side)
        return ds.read(1, out_shape=(math.ceil(ds.height / step), math.ceil(ds.width / step)))


@contextmanager
def _open_tiff(data: bytes) -> Iterator[DatasetReader]:
    """A uint8 TIFF's dataset opened from its bytes; ValueError for anything that is not one."""
    if not is_tiff(data):
        raise ValueError(f"not a PNG or TIFF mask (starts {data[:8]!r})")
    with MemoryFile(data) as memfile:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a mask of a plain image has none
            ds = memfile.open()
        with ds:
            if ds.dtypes[0] != "uint8":
                raise ValueError(f"a mask TIFF must be uint8, got {ds.dtypes[0]}")
            yield ds
