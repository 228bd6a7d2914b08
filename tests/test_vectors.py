"""Masks as polygons (pipeline.geo.vectors): exact pixel counts, seams merged, GeoParquet that GIS tools read.

Area bound under simplification: Douglas-Peucker keeps every removed vertex within ``t`` (the tolerance in
CRS units) of the chord that replaces its chain. With the chord on the x axis, the area between a chain and
its chord is |∫ y dx| ≤ t · ∫ |dx| ≤ t · (the chain's length), so a ring's area changes by at most
t × its length, and a class's summed area by at most t × its perimeter. A class's perimeter is its pixel
edges facing another class, no data or the image's edge (each lies on exactly one of its polygons' rings):
|Σ area − pixels · s²| ≤ tolerance · s × edges · s, with s the pixel size.
"""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from fsspec.implementations.local import LocalFileSystem
from rasterio.crs import CRS

from pipeline.geo.georef import Georef
from pipeline.geo.vectors import NODATA, PART_SCHEMA, POLYGON_SCHEMA, Polygonizer, VectorPartWriter

UTM = Georef("EPSG:32633", (10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0))  # 10 m pixels
CLASSES = ["background", "field", "water", "road", "forest", "urban"]


def polygonize(
    mask: np.ndarray, georef: Georef | None = None, tolerance: float = 0.0, block: int = 64, band: int | None = None
) -> pa.Table:
    height, width = mask.shape
    polygonizer = Polygonizer(height, width, georef, tolerance, block=block)
    band = band or height
    for row in range(0, height, band):
        polygonizer.add_rows(mask[row : row + band])
    return polygonizer.finish()


def blobs(height: int, width: int, classes: int, scale: float, seed: int) -> np.ndarray:
    """Blob-shaped regions: the class of the largest of ``classes`` smoothed noise fields."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    kernel = np.exp(-(fx**2 + fy**2) * (2 * np.pi * scale) ** 2 / 2)
    noise = rng.standard_normal((classes, height, width))
    fields = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=(height, width))
    return np.argmax(fields, axis=0).astype(np.uint8)


def noisy_blobs(seed: int = 0) -> np.ndarray:
    """Blobs over seams of block 64 (300 x 260: not a multiple), 3 % salt, no data in a corner and a stripe."""
    mask = blobs(300, 260, 6, 12, seed)
    rng = np.random.default_rng(seed + 1)
    salt = rng.random(mask.shape) < 0.03
    mask[salt] = rng.integers(0, 6, salt.sum())
    mask[:40, :50] = NODATA
    mask[150:153, :] = NODATA
    return mask


def class_edges(mask: np.ndarray, cls: int) -> int:
    """Pixel edges between ``cls`` and anything else (another class, no data, outside the image)."""
    padded = np.pad(mask == cls, 1)
    return int(np.sum(padded[1:] != padded[:-1]) + np.sum(padded[:, 1:] != padded[:, :-1]))


def geometries(table: pa.Table) -> np.ndarray:
    return shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))


def by_class(table: pa.Table, column: str) -> dict[int, float]:
    sums: dict[int, float] = {}
    for cls, value in zip(table["class"].to_pylist(), table[column].to_pylist(), strict=True):
        sums[cls] = sums.get(cls, 0) + value
    return sums


def canonical(table: pa.Table) -> list[tuple]:
    """Rows in an order independent of tracing: (class, pixels, area, bounds, geometry)."""
    geoms = geometries(table)
    rows = zip(table["class"].to_pylist(), table["pixels"].to_pylist(), table["area"].to_pylist(), geoms, strict=True)
    return sorted(((c, p, a, tuple(shapely.bounds(g)), g) for c, p, a, g in rows), key=lambda r: r[:4])


def test_schema_and_validity():
    table = polygonize(noisy_blobs(), tolerance=1.0)
    assert table.schema == POLYGON_SCHEMA
    geoms = geometries(table)
    assert set(shapely.get_type_id(geoms)) == {shapely.GeometryType.POLYGON}
    assert shapely.is_valid(geoms).all()
    assert not shapely.has_z(geoms).any()


def test_two_squares_and_a_ring_with_a_hole():
    mask = np.zeros((200, 200), np.uint8)
    mask[10:40, 10:40] = 1  # two separate squares of class 1
    mask[10:40, 150:190] = 1
    mask[60:190, 30:170] = 2  # a ring of class 2 across seams (block 64), around class 3
    mask[90:160, 60:140] = 3
    table = polygonize(mask, block=64)
    classes = table["class"].to_pylist()
    assert sorted(classes) == [0, 1, 1, 2, 3]
    geoms = geometries(table)
    ring = geoms[classes.index(2)]
    assert shapely.get_num_interior_rings(ring) == 1
    assert table["pixels"][classes.index(2)].as_py() == 130 * 140 - 70 * 80
    assert shapely.get_num_interior_rings(geoms[classes.index(0)]) == 3  # squares and ring cut out


def test_region_across_many_blocks_is_one_polygon():
    mask = np.zeros((256, 256), np.uint8)
    for row in range(8, 248, 40):  # a serpentine of class 1 through every block of 64
        mask[row : row + 10, 8:248] = 1
        side = slice(238, 248) if (row // 40) % 2 == 0 else slice(8, 18)
        mask[row : row + 50, side] = 1
    mask[248:, :] = 0
    table = polygonize(mask, block=64)
    ones = [p for c, p in zip(table["class"].to_pylist(), table["pixels"].to_pylist(), strict=True) if c == 1]
    assert ones == [int(np.sum(mask == 1))]


def test_diagonal_touch_stays_two_polygons():
    mask = np.zeros((128, 128), np.uint8)
    mask[32:64, 32:64] = 1  # the squares meet at one corner, on the seam crossing (64, 64): 4-connectivity
    mask[64:96, 64:96] = 1
    table = polygonize(mask, block=64)
    ones = [p for c, p in zip(table["class"].to_pylist(), table["pixels"].to_pylist(), strict=True) if c == 1]
    assert ones == [1024, 1024]


@pytest.mark.parametrize("tolerance", [0.0, 0.5, 1.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_pixels_exact_and_area_within_bound(tolerance, seed):
    mask = noisy_blobs(seed)
    table = polygonize(mask, tolerance=tolerance, block=64)
    pixels, areas = by_class(table, "pixels"), by_class(table, "area")
    assert set(pixels) == set(np.unique(mask[mask != NODATA]).tolist())
    for cls, count in pixels.items():
        assert count == int(np.sum(mask == cls))
        assert abs(areas[cls] - count) <= tolerance * class_edges(mask, cls)
    if tolerance == 0:
        assert table["area"].to_pylist() == [float(p) for p in table["pixels"].to_pylist()]


def test_same_polygons_whatever_the_bands():
    mask = noisy_blobs()
    whole = polygonize(mask, tolerance=1.0, block=64)
    for band in (1, 7, 64):
        assert polygonize(mask, tolerance=1.0, block=64, band=band).equals(whole)


@pytest.mark.parametrize("block", [32, 64, 100])
def test_same_polygons_whatever_the_blocks(block):
    """Merged seams give the polygons one tile gives: exactly at tolerance 0, the same regions when simplified."""
    mask = noisy_blobs()
    reference = canonical(polygonize(mask, block=1024))
    rows = canonical(polygonize(mask, block=block))
    assert [r[:4] for r in rows] == [r[:4] for r in reference]
    assert all(shapely.equals(r[4], s[4]) for r, s in zip(rows, reference, strict=True))
    simple, simple_reference = polygonize(mask, tolerance=1.0, block=block), polygonize(mask, tolerance=1.0, block=1024)
    assert sorted(zip(simple["class"].to_pylist(), simple["pixels"].to_pylist(), strict=True)) == sorted(
        zip(simple_reference["class"].to_pylist(), simple_reference["pixels"].to_pylist(), strict=True)
    )


def test_nodata_makes_no_polygon():
    mask = noisy_blobs()
    table = polygonize(mask, block=64)
    assert NODATA not in table["class"].to_pylist()
    nodata = shapely.union_all([shapely.box(0, 0, 50, 40), shapely.box(0, 150, 260, 153)])
    assert shapely.area(shapely.intersection(geometries(table), nodata)).sum() == 0
    empty = polygonize(np.full((70, 90), NODATA, np.uint8), block=64)
    assert empty.num_rows == 0 and empty.schema == POLYGON_SCHEMA


def test_simplified_hole_crossing_the_shell_is_kept_valid():
    """A bump of class 1 holding a one-pixel hole: simplified alone, the shell would cut the bump off and leave
    the hole outside; the polygon keeps those rings as traced and stays valid."""
    mask = np.zeros((30, 30), np.uint8)
    mask[5:25, 2:28] = 1
    mask[2:5, 10:14] = 1
    mask[3, 11] = 2
    table = polygonize(mask, tolerance=3.5, block=1024)
    geoms = geometries(table)
    assert shapely.is_valid(geoms).all()
    field = geoms[table["class"].to_pylist().index(1)]
    assert shapely.get_num_interior_rings(field) == 1
    assert shapely.contains(field.exterior.convex_hull, shapely.Point(11.5, 3.5))


def test_georeferenced_coordinates_and_areas():
    mask = noisy_blobs()
    plain, geo = polygonize(mask, block=64), polygonize(mask, UTM, block=64)
    xmin, ymin, xmax, ymax = UTM.bounds(*mask.shape)
    bounds = shapely.bounds(geometries(geo))
    assert (bounds[:, 0] >= xmin).all() and (bounds[:, 2] <= xmax).all()
    assert (bounds[:, 1] >= ymin).all() and (bounds[:, 3] <= ymax).all()
    assert geo["pixels"].equals(plain["pixels"])
    np.testing.assert_allclose(geo["area"].to_numpy(), plain["area"].to_numpy() * UTM.pixel_area, rtol=1e-9)
    simplified = polygonize(mask, UTM, tolerance=1.0, block=64)
    areas = by_class(simplified, "area")
    for cls, count in by_class(simplified, "pixels").items():
        assert abs(areas[cls] - count * UTM.pixel_area) <= 1.0 * 10 * class_edges(mask, cls) * 10


def test_rows_are_checked():
    polygonizer = Polygonizer(10, 20, None, 0.0)
    with pytest.raises(ValueError):
        polygonizer.add_rows(np.zeros((2, 20), np.int32))
    with pytest.raises(ValueError):
        polygonizer.add_rows(np.zeros((2, 21), np.uint8))
    polygonizer.add_rows(np.zeros((4, 20), np.uint8))
    with pytest.raises(ValueError):
        polygonizer.add_rows(np.zeros((7, 20), np.uint8))
    with pytest.raises(ValueError):
        polygonizer.finish()


def write_part(path: str, images: list[tuple[str, np.ndarray, Georef | None]]) -> list[pa.Table]:
    writer = VectorPartWriter(LocalFileSystem(), path)
    tables = []
    for image_id, mask, georef in images:
        tables.append(polygonize(mask, georef, tolerance=1.0, block=64))
        writer.add(image_id, tables[-1], georef, CLASSES)
    writer.close()
    return tables


def geo_column(path: str) -> dict:
    meta = json.loads(pq.read_schema(path).metadata[b"geo"])
    assert meta["version"] == "1.1.0" and meta["primary_column"] == "geometry"
    column = meta["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["geometry_types"] == ["Polygon"] and column["edges"] == "planar"
    assert "crs" in column  # missing would mean OGC:CRS84
    return column


def test_part_is_geoparquet_with_one_crs(tmp_path):
    path = str(tmp_path / "vectors" / "part-00003.parquet")
    tables = write_part(path, [("a.tif", noisy_blobs(0), UTM), ("b.tif", noisy_blobs(1), UTM)])
    part = pq.read_table(path)
    assert part.schema.remove_metadata() == PART_SCHEMA
    assert pq.ParquetFile(path).metadata.num_row_groups == 2
    assert part.num_rows == sum(t.num_rows for t in tables)
    assert set(part["image_id"].to_pylist()) == {"a.tif", "b.tif"} and set(part["crs"].to_pylist()) == {"EPSG:32633"}
    assert part["class_name"].to_pylist() == [CLASSES[c] for c in part["class"].to_pylist()]
    column = geo_column(path)
    assert column["crs"] == CRS.from_user_input("EPSG:32633").to_dict(projjson=True)
    assert column["crs"]["id"] == {"authority": "EPSG", "code": 32633}
    geoms = shapely.from_wkb(part["geometry"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(column["bbox"], shapely.total_bounds(geoms))
    sums = dict(duckdb.sql(f"select class, sum(area) from read_parquet('{path}') group by class").fetchall())
    expected = by_class(pa.concat_tables(tables), "area")
    assert sums.keys() == expected.keys()
    for cls, area in expected.items():
        assert sums[cls] == pytest.approx(area, rel=1e-12)


@pytest.mark.parametrize(
    "georefs",
    [[None, None], [UTM, None], [UTM, Georef("EPSG:32634", UTM.transform)]],
    ids=["none", "mixed", "two-crs"],
)
def test_part_crs_null_unless_one(tmp_path, georefs):
    path = str(tmp_path / "part-00000.parquet")
    write_part(path, [(f"{i}.png", noisy_blobs(i), g) for i, g in enumerate(georefs)])
    assert geo_column(path)["crs"] is None
    crs = pq.read_table(path, columns=["crs"])["crs"].to_pylist()
    assert set(crs) == {None if g is None else g.crs for g in georefs}


def test_empty_part_is_published_and_discard_publishes_nothing(tmp_path):
    path = str(tmp_path / "part-00001.parquet")
    write_part(path, [("blank.tif", np.full((50, 50), NODATA, np.uint8), UTM)])
    assert pq.read_table(path).num_rows == 0 and pq.read_table(path).schema.remove_metadata() == PART_SCHEMA
    assert geo_column(path)["crs"] is None and "bbox" not in geo_column(path)
    assert duckdb.sql(f"select count(*) from read_parquet('{path}')").fetchall() == [(0,)]
    discarded = VectorPartWriter(LocalFileSystem(), str(tmp_path / "part-00002.parquet"))
    discarded.add("a.tif", polygonize(noisy_blobs()), None, CLASSES)
    discarded.discard()
    assert not (tmp_path / "part-00002.parquet").exists()
