"""Masks as polygons per class, written as GeoParquet: what GIS users load into QGIS, GeoPandas or DuckDB spatial.

A mask (uint8 class per pixel, 255 = no data) is traced into one polygon per 4-connected region of a class,
holes kept. A huge mask arrives row band by row band and is never held whole: ``Polygonizer`` buffers one
block of rows and traces it in square tiles with GDAL (``rasterio.features.shapes``). A region cut by a tile
seam would come out in pieces, so pieces that touch an internal seam are held back and, once the whole mask
has been seen, unioned per class and split into connected parts: a field crossing a block boundary is one
polygon, the same whatever the band or block sizes. Tracing and merging work in pixel coordinates, where
every vertex is an integer: pieces meet exactly along seams, and a polygon's area is its exact pixel count.
Only then is each polygon mapped to the CRS and simplified.

``VectorPartWriter`` writes one shard's polygons as GeoParquet 1.1 (WKB geometry, the ``geo`` footer key with
CRS as PROJJSON and the bounding box), one row group per image.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import defaultdict

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import shapes

from pipeline import storage
from pipeline.geo.georef import Georef

NODATA = 255  # not a class: never a polygon
POLYGON_SCHEMA = pa.schema(
    [("class", pa.int32()), ("pixels", pa.int64()), ("area", pa.float64()), ("geometry", pa.binary())]
)
PART_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("class", pa.int32()),
        ("class_name", pa.string()),
        ("pixels", pa.int64()),
        ("area", pa.float64()),
        ("crs", pa.string()),
        ("geometry", pa.binary()),
    ]
)
GEOPARQUET_VERSION = "1.1.0"
_REPAIR_ROUNDS = 8  # ring reverts before a polygon that still is not valid is kept unsimplified


class Polygonizer:
    """The polygons per class of one image's mask, fed top to bottom in row bands of any height.

    Rows are buffered into blocks of ``block`` rows; each block is traced in tiles ``block`` wide. A polygon
    touching no internal seam is final at once (mapped, simplified, kept as WKB); one touching a seam is held,
    in pixel coordinates, until ``finish`` unions the held pieces per class. Memory: one block of rows
    (``block`` x ``width`` bytes) plus the held seam polygons, besides the finished rows of the result.

    ``tolerance`` is the simplification tolerance in pixels (0: none); ``georef`` maps pixels to its CRS
    (None: coordinates stay pixels, x right and y down, and areas are in pixels²).
    """

    def __init__(self, height: int, width: int, georef: Georef | None, tolerance: float, block: int = 1024) -> None:
        if height < 1 or width < 1 or block < 1 or tolerance < 0:
            raise ValueError(f"bad polygonizer shape {height}x{width}, block {block} or tolerance {tolerance}")
        self.height, self.width, self.georef, self.block = height, width, georef, block
        pixel_size = 1.0 if georef is None else float(np.sqrt(georef.pixel_area))
        self._tolerance = tolerance * pixel_size
        self._buffer = np.empty((min(block, height), width), np.uint8)
        self._filled = 0  # rows in the buffer
        self._top = 0  # image row of the buffer's first row
        self._held: dict[int, list[shapely.Polygon]] = defaultdict(list)
        self._done: list[pa.Table] = []

    def add_rows(self, rows: np.ndarray) -> None:
        """Append the next ``rows`` (uint8, [n, width]) of the mask."""
        if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"rows must be uint8 [n, {self.width}], got {rows.dtype} {list(rows.shape)}")
        if self._top + self._filled + len(rows) > self.height:
            raise ValueError(f"more than {self.height} rows fed")
        while len(rows):
            take = min(len(self._buffer) - self._filled, len(rows))
            self._buffer[self._filled : self._filled + take] = rows[:take]
            self._filled, rows = self._filled + take, rows[take:]
            if self._filled == len(self._buffer):
                self._trace_block()

    def finish(self) -> pa.Table:
        """The image's polygons (``POLYGON_SCHEMA``), once every row has been fed."""
        if self._filled:
            self._trace_block()
        if self._top != self.height:
            raise ValueError(f"{self._top} of {self.height} rows fed")
        for cls, pieces in sorted(self._held.items()):
            merged = _merge(np.array(pieces, dtype=object))
            self._emit(np.full(len(merged), cls, np.int32), merged)
        self._held.clear()
        return pa.concat_tables(self._done) if self._done else POLYGON_SCHEMA.empty_table()

    def _trace_block(self) -> None:
        rows = self._buffer[: self._filled]
        for col in range(0, self.width, self.block):
            tile = rows[:, col : col + self.block]
            classes, polygons = _trace(tile, self._top, col)
            on_seam = self._on_seam(shapely.bounds(polygons), self._top, col, tile.shape)
            for cls, polygon in zip(classes[on_seam], polygons[on_seam], strict=True):
                self._held[int(cls)].append(polygon)
            self._emit(classes[~on_seam], polygons[~on_seam])
        self._top += self._filled
        self._filled = 0
        self._buffer = self._buffer[: min(self.block, self.height - self._top)]

    def _on_seam(self, bounds: np.ndarray, row: int, col: int, shape: tuple[int, int]) -> np.ndarray:
        """Which polygons (by their pixel bounds) touch an edge of the tile at (``row``, ``col``) that is not
        an edge of the image."""
        bottom, right = row + shape[0], col + shape[1]
        xmin, ymin, xmax, ymax = bounds.T
        return (
            ((xmin == col) & (col > 0))
            | ((ymin == row) & (row > 0))
            | ((xmax == right) & (right < self.width))
            | ((ymax == bottom) & (bottom < self.height))
        )

    def _emit(self, classes: np.ndarray, polygons: np.ndarray) -> None:
        """Keep final pixel-space ``polygons``: counted, mapped to the CRS, simplified, measured, as WKB."""
        if not len(polygons):
            return
        pixels = np.rint(shapely.area(polygons)).astype(np.int64)
        geoms = _to_crs(polygons, self.georef)
        if self._tolerance > 0:
            geoms = _simplify(geoms, self._tolerance)
        geoms = shapely.orient_polygons(geoms)  # shells counterclockwise, holes clockwise, whatever the transform
        table = {
            "class": pa.array(classes, pa.int32()),
            "pixels": pa.array(pixels, pa.int64()),
            "area": pa.array(shapely.area(geoms), pa.float64()),
            "geometry": pa.array(shapely.to_wkb(geoms, output_dimension=2), pa.binary()),
        }
        self._done.append(pa.table(table, schema=POLYGON_SCHEMA))


def _trace(tile: np.ndarray, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
    """GDAL's 4-connected polygons of ``tile`` (no data masked out) in image pixel coordinates: their classes
    (int32) and polygons. Built in one go from the coordinate lists (faster than a shape per polygon)."""
    traced = list(shapes(tile, mask=tile != NODATA, connectivity=4, transform=Affine.translation(col, row)))
    if not traced:
        return np.empty(0, np.int32), np.empty(0, dtype=object)
    rings = [ring for geom, _ in traced for ring in geom["coordinates"]]
    coords = np.array([xy for ring in rings for xy in ring], np.float64)
    ring_offsets = np.concatenate([[0], np.cumsum([len(ring) for ring in rings])])
    polygon_offsets = np.concatenate([[0], np.cumsum([len(geom["coordinates"]) for geom, _ in traced])])
    polygons = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, (ring_offsets, polygon_offsets))
    return np.array([value for _, value in traced], np.int32), polygons


def _merge(pieces: np.ndarray) -> np.ndarray:
    """The connected parts of the union of one class's seam ``pieces`` (pixel coordinates).

    A piece's holes lie strictly inside its tile (a region reaching the tile's edge is no hole), so they never
    meet a seam: only the shells are unioned, which is cheap, and each hole is put back into the part that
    covers it. Unioning the pieces whole costs minutes on a noisy mask (overlay of thousands of holes).
    """
    parts = shapely.get_parts(shapely.union_all(shapely.polygons(shapely.get_exterior_ring(pieces))))
    # Seam vertices left on straight edges: dropped exactly (integer coordinates, tolerance 0).
    parts = shapely.simplify(parts, 0.0, preserve_topology=False)
    # Each piece lies in one part, and its holes with it: found by a point of the piece's filled shell.
    inside = shapely.point_on_surface(shapely.polygons(shapely.get_exterior_ring(pieces)))
    shapely.prepare(parts)
    part_index, piece_index = shapely.STRtree(inside).query(parts, predicate="contains")
    owner = np.empty(len(pieces), np.intp)
    owner[piece_index] = part_index
    rings, piece_of_ring = shapely.get_rings(pieces, return_index=True)
    holes = _hole_mask(pieces)
    holes_of_part = owner[piece_of_ring[holes]]
    order = np.argsort(holes_of_part, kind="stable")
    grouped = np.split(rings[holes][order], np.searchsorted(holes_of_part[order], np.arange(1, len(parts))))
    return np.array([_with_holes(part, part_holes) for part, part_holes in zip(parts, grouped, strict=True)])


def _hole_mask(polygons: np.ndarray) -> np.ndarray:
    """For ``shapely.get_rings(polygons)``: which rings are holes (each polygon's rings: shell, then holes)."""
    counts = shapely.get_num_interior_rings(polygons) + 1
    starts = np.concatenate([[0], counts.cumsum()[:-1]])
    mask = np.ones(counts.sum(), bool)
    mask[starts] = False
    return mask


def _with_holes(part: shapely.Polygon, holes: np.ndarray) -> shapely.Polygon:
    if not len(holes):
        return part
    return shapely.polygons(shapely.get_exterior_ring(part), [*shapely.get_rings(part)[1:], *holes])


def _simplify(polygons: np.ndarray, tolerance: float) -> np.ndarray:
    """``shapely.simplify(polygons, tolerance, preserve_topology=True)``, ring by ring.

    GEOS's topology-preserving simplifier is quadratic in a polygon's rings (a noisy class's polygon with 60,000
    one-pixel holes takes 95 s), so each ring is simplified on its own (the same Douglas-Peucker bound) and the
    rings put back together; the few polygons where a simplified ring then meets another are repaired.
    """
    rings, owner = shapely.get_rings(polygons, return_index=True)
    simple = shapely.get_exterior_ring(shapely.simplify(shapely.polygons(rings), tolerance, preserve_topology=True))
    out = shapely.polygons(simple, indices=owner)
    starts = np.searchsorted(owner, np.arange(len(polygons) + 1))
    with_holes = np.flatnonzero(np.diff(starts) > 1)  # one ring simplified alone stays valid
    for i in with_holes[~shapely.is_valid(out[with_holes])]:
        out[i] = _repair(polygons[i], simple[starts[i] : starts[i + 1]])
    return out


def _repair(original: shapely.Polygon, simple: np.ndarray) -> shapely.Polygon:
    """``original`` with its rings simplified (``simple``: shell, then holes), except those that would cross
    another: they stay as they were. ``original`` itself if that is still not valid."""
    rings, simple = shapely.get_rings(original), simple.copy()
    for _ in range(_REPAIR_ROUNDS):
        conflicts = _conflicts(simple)
        if not len(conflicts):
            break
        simple[conflicts] = rings[conflicts]
    repaired = shapely.polygons(simple, indices=np.zeros(len(simple), np.intp))[0]
    return repaired if shapely.is_valid(repaired) else original


def _conflicts(rings: np.ndarray) -> np.ndarray:
    """Which of a polygon's ``rings`` (shell, then holes) cross another: a hole not inside the shell (it and
    the shell), holes whose insides meet (both)."""
    filled = shapely.polygons(rings)
    shapely.prepare(filled[0])
    outside = np.flatnonzero(~shapely.covers(filled[0], filled[1:])) + 1
    a, b = shapely.STRtree(filled[1:]).query(filled[1:], predicate="intersects")
    a, b = a[a < b], b[a < b]
    meet = shapely.relate_pattern(filled[1:][a], filled[1:][b], "T********")
    shell = [0] if len(outside) else []
    return np.unique(np.concatenate([shell, outside, a[meet] + 1, b[meet] + 1]).astype(np.intp))


def _to_crs(polygons: np.ndarray, georef: Georef | None) -> np.ndarray:
    """Pixel-space polygons in ``georef``'s CRS (unchanged without one)."""
    if georef is None:
        return polygons
    a, b, c, d, e, f = georef.transform
    matrix, offset = np.array([[a, d], [b, e]]), np.array([c, f])
    return shapely.transform(polygons, lambda xy: xy @ matrix + offset)


class VectorPartWriter:
    """One shard's ``vectors/part-<shard>.parquet``: GeoParquet 1.1, one row group per image.

    Rows are written to a local temporary file as they come (``add``) and published at ``close``, with the
    ``geo`` footer: WKB polygons, their bounding box, and the CRS as PROJJSON when every image with polygons
    shares one (JSON null when none is georeferenced or they differ: a missing crs would mean OGC:CRS84).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path
        handle, self._local = tempfile.mkstemp(prefix="segpipe-vectors-", suffix=".parquet")
        os.close(handle)
        # No stored Arrow schema (the columns' Parquet types say it all): with one, pyarrow would show its
        # empty metadata as the schema's instead of the footer's, and readers of schema.metadata miss "geo".
        self._writer = pq.ParquetWriter(self._local, PART_SCHEMA, compression="zstd", store_schema=False)
        self._crs: set[str | None] = set()
        self._bbox = np.array([np.inf, np.inf, -np.inf, -np.inf])
        self._lock = threading.Lock()

    def add(self, image_id: str, table: pa.Table, georef: Georef | None, class_names: list[str]) -> None:
        """Append one image's polygons (a ``Polygonizer.finish`` table) as one row group."""
        n = table.num_rows
        if n == 0:
            return
        crs = None if georef is None else georef.crs
        classes = table["class"].to_numpy()
        columns = {
            "image_id": pa.array([image_id] * n, pa.string()),
            "class": table["class"],
            "class_name": pa.array(np.asarray(class_names, dtype=object)[classes], pa.string()),
            "pixels": table["pixels"],
            "area": table["area"],
            "crs": pa.array([crs] * n, pa.string()),
            "geometry": table["geometry"],
        }
        bounds = shapely.total_bounds(shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False)))
        with self._lock:  # a shard's images finish on several IO threads at once
            self._writer.write_table(pa.table(columns, schema=PART_SCHEMA), row_group_size=n)
            self._crs.add(crs)
            low, high = np.minimum(self._bbox[:2], bounds[:2]), np.maximum(self._bbox[2:], bounds[2:])
            self._bbox = np.concatenate([low, high])

    def close(self) -> None:
        """Write the ``geo`` footer and publish the file (with no rows too, so that it exists)."""
        try:
            self._writer.add_key_value_metadata({"geo": json.dumps(self.geo_metadata())})
            self._writer.close()
            storage.write_file(self.fs, self.path, self._local)
        finally:
            _remove(self._local)

    def discard(self) -> None:
        """Drop the part: nothing is published."""
        self._writer.close()
        _remove(self._local)

    def geo_metadata(self) -> dict:
        """GeoParquet 1.1's ``geo`` metadata for the rows added so far."""
        column: dict = {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": _projjson(self._crs)}
        if np.all(np.isfinite(self._bbox)):
            column["bbox"] = [float(v) for v in self._bbox]
        column["edges"] = "planar"
        return {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}


def _projjson(crs: set[str | None]) -> dict | None:
    """The PROJJSON of the one CRS of ``crs``; None when there is none, several, or an image without one."""
    if len(crs) != 1 or None in crs:
        return None
    return CRS.from_user_input(next(iter(crs))).to_dict(projjson=True)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
