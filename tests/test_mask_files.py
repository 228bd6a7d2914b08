"""Mask files written band by band: a streamed palette PNG and a COG, read back with Pillow and rasterio."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile

from pipeline.geo.georef import Georef
from pipeline.geo.mask_files import (
    MASK_FORMATS,
    decode_mask,
    mask_suffix,
    open_mask_writer,
    read_mask_thumbnail,
)
from pipeline.palette import mask_to_png, voc_colormap
from pipeline.storage import TMP_MARK, write_file

REPO = Path(__file__).resolve().parent.parent
PALETTE = voc_colormap()
GEOREF = Georef("EPSG:32633", (0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0))


@pytest.fixture
def fs() -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("file")


def random_mask(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 21, (height, width), dtype=np.uint8)
    mask[rng.random((height, width)) < 0.05] = 255
    return mask


def write(fmt: str, fs, path: str, mask: np.ndarray, band: int, georef: Georef | None = None) -> None:
    with open_mask_writer(fmt, fs, path, *mask.shape, PALETTE, georef) as writer:
        for top in range(0, len(mask), band):
            writer.write_rows(mask[top : top + band])


def png_chunks(data: bytes) -> list[bytes]:
    kinds, at = [], 8
    while at < len(data):
        (length,) = np.frombuffer(data[at : at + 4], ">u4")
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        assert int.from_bytes(data[at + 8 + length : at + 12 + length], "big") == zlib.crc32(kind + body)
        kinds.append(kind)
        at += 12 + int(length)
    return kinds


def leftovers(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    ("shape", "band"),
    [((1, 1), 1), ((3, 1000), 1), ((3, 1000), 2), ((1000, 3), 7), ((1000, 3), 1000), ((257, 513), 64)],
)
def test_png_writer_decodes_as_mask_to_png(fs, tmp_path, shape, band):
    mask = random_mask(*shape)
    path = str(tmp_path / f"m{mask_suffix('png')}")
    write("png", fs, path, mask, band)
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as got, Image.open(io.BytesIO(mask_to_png(mask, PALETTE))) as want:
        assert got.mode == want.mode == "P"
        assert np.array_equal(np.asarray(got), np.asarray(want))
        assert got.getpalette() == want.getpalette()
    assert np.array_equal(decode_mask(data), mask)
    assert leftovers(tmp_path) == [Path(path)]


def test_png_writer_splits_idat_chunks(fs, tmp_path):
    mask = random_mask(1500, 1500)  # ~1.5 MB of noise compressed: more than one IDAT chunk
    path = str(tmp_path / "m.png")
    write("png", fs, path, mask, 100)
    data = Path(path).read_bytes()
    kinds = png_chunks(data)
    assert kinds[:2] == [b"IHDR", b"PLTE"] and kinds[-1] == b"IEND"
    assert kinds[2:-1] == [b"IDAT"] * (len(kinds) - 3) and len(kinds) - 3 >= 2
    assert np.array_equal(decode_mask(data), mask)


def test_geotiff_writer_gives_a_cog(fs, tmp_path):
    mask = random_mask(2100, 2300)
    path = str(tmp_path / "out" / "m.tif")
    write("geotiff", fs, path, mask, 300, GEOREF)
    with rasterio.open(path) as ds:
        assert ds.profile["tiled"] and ds.block_shapes == [(512, 512)]
        assert ds.profile["compress"] == "deflate"
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.overviews(1) == [2, 4, 8]
        cmap = ds.colormap(1)
        for k in (0, 1, 15, 20, 254):
            assert cmap[k] == (*(int(c) for c in PALETTE[k]), 255)
        assert cmap[255] == (224, 224, 192, 0)  # GDAL reads the nodata entry of a colour map as transparent
        assert ds.nodata == 255
        assert ds.crs == rasterio.CRS.from_string(GEOREF.crs)
        assert ds.transform == GEOREF.affine
        assert np.array_equal(ds.read(1), mask)
    assert leftovers(tmp_path) == [Path(path)]


def test_cog_overviews_take_the_mode(fs, tmp_path):
    """Each 2x2 block holds three 1s and one 5, the 5 in every position in turn: MODE gives 1 everywhere,
    where NEAREST would pick up 5s and AVERAGE 2s."""
    blocks_y, blocks_x = np.mgrid[0:512, 0:1024]
    mask = np.ones((1024, 2048), dtype=np.uint8)
    for position, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        mask[dy::2, dx::2][(blocks_y + blocks_x) % 4 == position] = 5
    path = str(tmp_path / "m.tif")
    write("geotiff", fs, path, mask, 256, GEOREF)
    with rasterio.open(path, OVERVIEW_LEVEL=0) as ds:
        assert ds.shape == (512, 1024)
        assert np.unique(ds.read(1)).tolist() == [1]


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_geotiff_writer_without_georef(fs, tmp_path):
    mask = random_mask(700, 900)
    path = str(tmp_path / "m.tif")
    write("geotiff", fs, path, mask, 128)
    with rasterio.open(path) as ds:
        assert ds.crs is None
        assert ds.transform.is_identity
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.colormap(1)[3] == (*(int(c) for c in PALETTE[3]), 255)
        assert np.array_equal(ds.read(1), mask)


@pytest.mark.parametrize("fmt", MASK_FORMATS)
def test_close_with_rows_missing_raises_and_writes_nothing(fs, tmp_path, fmt):
    path = str(tmp_path / f"m{mask_suffix(fmt)}")
    writer = open_mask_writer(fmt, fs, path, 600, 40, PALETTE, None)
    writer.write_rows(np.zeros((599, 40), dtype=np.uint8))
    with pytest.raises(ValueError, match="599 of its 600 rows"):
        writer.close()
    assert leftovers(tmp_path) == []
    assert not Path(writer.local_path).parent.exists()


@pytest.mark.parametrize("fmt", MASK_FORMATS)
def test_discard_and_exceptions_leave_nothing(fs, tmp_path, fmt):
    path = str(tmp_path / f"m{mask_suffix(fmt)}")
    writer = open_mask_writer(fmt, fs, path, 600, 40, PALETTE, GEOREF)
    writer.write_rows(np.zeros((600, 40), dtype=np.uint8))
    writer.discard()
    writer.discard()
    assert not Path(writer.local_path).parent.exists()
    with pytest.raises(RuntimeError), open_mask_writer(fmt, fs, path, 10, 10, PALETTE, GEOREF) as writer:
        writer.write_rows(np.zeros((10, 10), dtype=np.uint8))
        raise RuntimeError("inference failed")
    assert not Path(writer.local_path).parent.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", MASK_FORMATS)
def test_write_rows_checks_its_input(fs, tmp_path, fmt):
    with open_mask_writer(fmt, fs, str(tmp_path / f"m{mask_suffix(fmt)}"), 4, 5, PALETTE, None) as writer:
        for bad in (np.zeros((1, 6), np.uint8), np.zeros((1, 5), np.int32), np.zeros(5, np.uint8)):
            with pytest.raises(ValueError, match="rows must be"):
                writer.write_rows(bad)
        with pytest.raises(ValueError, match="exceed"):
            writer.write_rows(np.zeros((5, 5), np.uint8))
        writer.write_rows(np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="already closed"):
        writer.write_rows(np.zeros((1, 5), np.uint8))


def test_formats_and_palette_are_checked(fs, tmp_path):
    assert [mask_suffix(f) for f in MASK_FORMATS] == [".png", ".tif"]
    with pytest.raises(ValueError, match="unknown mask format"):
        mask_suffix("jpeg")
    with pytest.raises(ValueError, match="unknown mask format"):
        open_mask_writer("jpeg", fs, str(tmp_path / "m.jpg"), 1, 1, PALETTE, None)
    with pytest.raises(ValueError, match="palette"):
        open_mask_writer("png", fs, str(tmp_path / "m.png"), 1, 1, voc_colormap(21), None)


def test_decode_mask_sniffs_the_format(fs, tmp_path):
    mask = random_mask(33, 65)
    for fmt in MASK_FORMATS:
        path = tmp_path / f"m{mask_suffix(fmt)}"
        write(fmt, fs, str(path), mask, 10, GEOREF)
        assert np.array_equal(decode_mask(path.read_bytes()), mask)
    with pytest.raises(ValueError, match="not a PNG or TIFF"):
        decode_mask(b"GIF89a" + bytes(100))
    with MemoryFile() as memfile, pytest.warns(NotGeoreferencedWarning):
        with memfile.open(driver="GTiff", height=2, width=2, count=1, dtype="uint16") as ds:
            ds.write(np.zeros((2, 2), np.uint16), 1)
        with pytest.raises(ValueError, match="must be uint8"):
            decode_mask(memfile.read())


@pytest.mark.parametrize(
    ("fmt", "shape", "max_side", "expected"),
    [
        ("png", (1000, 3), 100, (100, 1)),
        ("png", (40, 30), 100, (40, 30)),
        ("geotiff", (2100, 2300), 256, (234, 256)),
        ("geotiff", (1300, 700), 300, (260, 140)),
    ],
)
def test_thumbnail_shapes(fs, tmp_path, fmt, shape, max_side, expected):
    mask = random_mask(*shape)
    path = tmp_path / f"m{mask_suffix(fmt)}"
    write(fmt, fs, str(path), mask, 512, GEOREF)
    thumb = read_mask_thumbnail(path.read_bytes(), max_side)
    assert thumb.shape == expected and thumb.dtype == np.uint8
    assert set(np.unique(thumb)) <= set(np.unique(mask))


def test_write_file_publishes_a_copy(fs, tmp_path):
    source = tmp_path / "local.bin"
    source.write_bytes(b"mask bytes")
    target = tmp_path / "out" / "deep" / "m.bin"
    write_file(fs, str(target), str(source))
    assert target.read_bytes() == b"mask bytes" and source.exists()
    assert not [p for p in tmp_path.rglob("*") if TMP_MARK in p.name]


def test_writers_publish_to_a_remote_filesystem(tmp_path):
    """fsspec's in-memory filesystem stands for an object store: ``write_file`` takes its ``put_file`` path."""
    memory = fsspec.filesystem("memory")
    mask = random_mask(50, 70)
    root = f"/segpipe-test-{tmp_path.name}"
    try:
        for fmt in MASK_FORMATS:
            write(fmt, memory, f"{root}/m{mask_suffix(fmt)}", mask, 16, GEOREF)
            assert np.array_equal(decode_mask(memory.cat_file(f"{root}/m{mask_suffix(fmt)}")), mask)
    finally:
        memory.rm(root, recursive=True)


MEMORY_PROBE = """
import json, resource, sys
import fsspec, numpy as np
from pipeline.geo.georef import Georef
from pipeline.geo.mask_files import open_mask_writer
from pipeline.palette import voc_colormap

fs, out, side, band = fsspec.filesystem("file"), sys.argv[1], 8000, 256
georef = Georef("EPSG:32633", (0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0))
with open_mask_writer("geotiff", fs, out + "/warm.tif", 600, 600, voc_colormap(), georef) as w:
    w.write_rows(np.zeros((600, 600), np.uint8))  # GDAL, PROJ and the drivers loaded before measuring
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
columns = (np.arange(side) // 53 % 21).astype(np.uint8)
with open_mask_writer("geotiff", fs, out + "/big.tif", side, side, voc_colormap(), georef) as w:
    for top in range(0, side, band):
        rows = (np.arange(top, min(top + band, side)) // 37 % 21).astype(np.uint8)[:, None] + columns[None, :]
        rows[:, :100] = 255
        w.write_rows(rows)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mb": (after - before) / 1024}))
"""


def test_geotiff_writer_memory_is_bounded(tmp_path):
    """An 8000 x 8000 mask (64 MB whole) in 256-row bands: the peak RSS grows by ~36 MB (measured: the 4 MB
    tile row being filled, GDAL's 16 MB block cache, the COG driver's overview chunks, a band of rows). 48 MB
    leaves a third for allocator noise and still fails if the mask, or the band plus a copy, were ever whole."""
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    growth = json.loads(run.stdout.strip().splitlines()[-1])["growth_mb"]
    assert growth < 48, growth
    with rasterio.open(tmp_path / "big.tif") as ds:
        assert ds.shape == (8000, 8000) and len(ds.overviews(1)) == 4
        assert ds.read(1, window=((7990, 8000), (0, 200)))[:, :100].tolist() == [[255] * 100] * 10
