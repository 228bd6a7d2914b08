"""Geospatial and gigapixel inputs: TIFFs read window by window, georeferenced masks, polygons for GIS.

The model is ``pointwise`` (a 1x1 convolution) with weights set by hand: each pixel's class follows its colour,
so masks have regions, and the cost is the pipeline's, not a network's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from PIL import Image
from rasterio.transform import from_origin

from pipeline.config import EvaluateConfig, JobConfig
from pipeline.evaluate import evaluate_output
from pipeline.job import finalize_job, plan_job
from pipeline.palette import png_to_mask
from pipeline.report.page import write_report
from pipeline.shard import ShardProcessor

CRS = "EPSG:32633"
TRANSFORM = from_origin(500_000, 6_000_000, 10, 10)  # 10 m pixels
NUM_CLASSES = 4


def pointwise_checkpoint(path) -> str:
    """Classes 0-2: the brightest of R, G, B; class 3: dark pixels (a constant that wins when all are low)."""
    import torch

    from pipeline.models import get_model
    from pipeline.models.checkpoint import default_meta, save_checkpoint

    model = get_model("pointwise", num_classes=NUM_CLASSES)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        for c in range(3):
            model.head.weight[c, c] = 1.0
        model.head.bias[3] = 0.3
    path.write_bytes(save_checkpoint(model, default_meta("pointwise", [f"c{i}" for i in range(NUM_CLASSES)])))
    return str(path)


def scene(height: int, width: int, rows: slice | None = None) -> np.ndarray:
    """[3, h, w] uint8 waves: smooth regions of every class, the same pixels whichever rows are asked for."""
    rows = rows or slice(0, height)
    yy, xx = np.mgrid[rows, 0:width].astype(np.float32)
    yy, xx = yy / height, xx / width
    bands = [np.sin(xx * 9) * 0.5 + 0.5, np.cos(yy * 7) * 0.5 + 0.5, np.sin((xx + yy) * 5) * 0.5 + 0.5]
    return (np.stack(bands) * 255).astype(np.uint8)


def write_geotiff(path, height: int, width: int, band_rows: int = 2048) -> None:
    """A tiled, deflate-compressed BigTIFF in EPSG:32633, written band by band (never whole here either)."""
    profile = dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=CRS, transform=TRANSFORM)
    profile |= dict(tiled=True, blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="YES")
    with rasterio.open(path, "w", **profile) as ds:
        for top in range(0, height, band_rows):
            rows = slice(top, min(top + band_rows, height))
            ds.write(scene(height, width, rows), window=((rows.start, rows.stop), (0, width)))


def job(tmp_path, images, out, checkpoint, **fields) -> JobConfig:
    base = dict(input_uri=str(images), output_uri=str(out), checkpoint_uri=checkpoint, shard_size=8)
    base |= dict(outputs={"report": False}, inference={"mode": "slide", "tile": [1024, 1024], "overlap": 0.0})
    return JobConfig(**(base | fields))


def run_in_process(cfg: JobConfig) -> dict:
    plan = plan_job(cfg)
    processor = ShardProcessor(plan.cfg, plan.run_id, torch_threads=2)
    return finalize_job(plan, [processor(shard) for shard in plan.pending], 1.0)


def rows_of(out) -> list[dict]:
    return pq.read_table(out / "stats").to_pylist()


# The job in a fresh process, its peak RSS measured around the work: what an actor holds for one huge image.
PEAK_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    from pathlib import Path
    from pipeline.config import JobConfig
    from pipeline.job import finalize_job, plan_job
    from pipeline.shard import ShardProcessor

    def peak_mb():  # this process's own high-water mark (ru_maxrss would carry the parent's over exec)
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024

    cfg = JobConfig.model_validate_json(sys.argv[1])
    plan = plan_job(cfg)
    processor = ShardProcessor(plan.cfg, plan.run_id, torch_threads=2)
    before = peak_mb()
    summaries = [processor(shard) for shard in plan.pending]
    growth = peak_mb() - before
    finalize_job(plan, summaries, 1.0)
    print(json.dumps({"growth_mb": growth, "before_mb": before}))
    """
)


def peak_growth_mb(cfg: JobConfig) -> float:
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, cfg.model_dump_json()], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["growth_mb"]


@pytest.mark.slow
def test_a_12k_geotiff_is_segmented_by_windows_into_a_cog_equal_to_its_png_in_slide_mode(tmp_path):
    size = 12_000
    checkpoint = pointwise_checkpoint(tmp_path / "pointwise.pt")
    windows = {"batch_size": 4, "inference": {"mode": "slide", "tile": [512, 512], "overlap": 0.0}}
    for name, height in (("tif", size), ("strip", 1_000)):
        (tmp_path / name).mkdir()
        write_geotiff(tmp_path / name / "scene.tif", height, size)
    growth = peak_growth_mb(job(tmp_path, tmp_path / "tif", tmp_path / "out-tif", checkpoint, **windows))
    strip = peak_growth_mb(job(tmp_path, tmp_path / "strip", tmp_path / "out-strip", checkpoint, **windows))
    # Decoding it whole would take 432 MB of RGB and 144 MB of mask before anything else (the PNG path grows
    # ~1,010 MB here). Windowed, the actor holds a row of windows across the width (fp32 sums and weights of
    # 512 x 12,000 pixels, 4 classes: 123 MB), two bands of pixels (the one cropped and the next, read
    # meanwhile), a batch, GDAL's block cache and the COG's overviews: 400-455 MB measured, against 350-360 MB
    # for a strip of 1,000 rows of the same width. Memory follows the width, not the image.
    assert growth < 550, f"peak RSS grew {growth:.0f} MB"
    assert growth < strip + 150, f"12,000 rows: {growth:.0f} MB, 1,000 rows: {strip:.0f} MB"

    mask_file = tmp_path / "out-tif" / "masks" / "scene.tif.tif"
    with rasterio.open(mask_file) as ds:
        assert (ds.crs.to_epsg(), ds.transform, ds.width, ds.height) == (32633, TRANSFORM, size, size)
        assert ds.profile["tiled"] and ds.profile["compress"] == "deflate" and ds.overviews(1)
        assert ds.nodata == 255 and ds.colormap(1)[1][:3] == (128, 0, 0)  # VOC's class 1
        tif_mask = ds.read(1)
    row = rows_of(tmp_path / "out-tif")[0]
    assert row["crs"] == CRS and row["error"] is None
    assert row["bounds"] == {"xmin": 500_000, "ymin": 6_000_000 - 10 * size, "xmax": 500_000 + 10 * size, "ymax": 6e6}
    assert sum(row["class_pixels"]) == size * size and row["nodata_pixels"] == 0

    # The same pixels as a PNG, decoded whole and segmented in slide mode with the same windows.
    (tmp_path / "png").mkdir()
    Image.fromarray(scene(size, size).transpose(1, 2, 0)).save(tmp_path / "png" / "scene.png", compress_level=1)
    run_in_process(job(tmp_path, tmp_path / "png", tmp_path / "out-png", checkpoint, **windows))
    png_mask = png_to_mask((tmp_path / "out-png" / "masks" / "scene.png.png").read_bytes())
    assert np.array_equal(tif_mask, png_mask)
    png_row = rows_of(tmp_path / "out-png")[0]
    assert png_row["class_pixels"] == row["class_pixels"]
    assert png_row["mean_confidence"] == pytest.approx(row["mean_confidence"], rel=1e-6)
    assert len(np.unique(tif_mask)) == NUM_CLASSES


@pytest.mark.parametrize("tiled", [True, False], ids=["tiled", "striped"])
def test_a_4_band_16_bit_scene_reads_the_bands_asked_for_and_leaves_nodata_out(tmp_path, tiled):
    from pipeline.inference.predictor import Predictor
    from pipeline.models.loading import load_model

    height, width, nodata = 700, 900, 0
    rng = np.random.default_rng(7)
    data = rng.integers(100, 12_000, (4, height, width)).astype(np.uint16)
    data[:, 100:300, 200:500] = nodata  # a hole without data
    data[:, :, :40] = nodata  # and the scene's left edge
    (tmp_path / "in").mkdir()
    profile = dict(driver="GTiff", width=width, height=height, count=4, dtype="uint16", crs=CRS, transform=TRANSFORM)
    with rasterio.open(tmp_path / "in" / "s2.tif", "w", nodata=nodata, tiled=tiled, **profile) as ds:
        ds.write(data)
    truth = rng.integers(0, NUM_CLASSES, (height, width)).astype(np.uint8)  # a label as an index PNG beside it
    (tmp_path / "labels").mkdir()
    Image.fromarray(truth).save(tmp_path / "labels" / "s2.png")
    checkpoint = pointwise_checkpoint(tmp_path / "pointwise.pt")
    cfg = job(tmp_path, tmp_path / "in", tmp_path / "out", checkpoint, input={"bands": [3, 2, 1]})
    cfg = cfg.model_copy(update={"labels_uri": str(tmp_path / "labels")})
    cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"tile": (256, 256)})})
    run_in_process(cfg)

    with rasterio.open(tmp_path / "out" / "masks" / "s2.tif.tif") as ds:
        mask = ds.read(1)
    hole = data[0] == nodata
    assert (mask[hole] == 255).all() and (mask[~hole] < NUM_CLASSES).all()
    row = rows_of(tmp_path / "out")[0]
    assert row["nodata_pixels"] == int(hole.sum())
    assert sum(row["class_pixels"]) == int((~hole).sum())
    assert sum(row["class_fraction"]) == pytest.approx(1.0, abs=1e-5)
    assert row["labeled"] and sum(c["count"] for c in row["confusion"]) == int((~hole).sum())  # nodata: no cell
    expected_cells = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(expected_cells, (truth[~hole], mask[~hole]), 1)
    assert {(c["gt"], c["pred"]): c["count"] for c in row["confusion"]} == {
        (i, j): int(n) for (i, j), n in np.ndenumerate(expected_cells) if n
    }
    evaluated = evaluate_output(EvaluateConfig(output_uri=str(tmp_path / "out"), labels_uri=str(tmp_path / "labels")))
    assert evaluated["pixel_accuracy"] == pytest.approx(np.trace(expected_cells) / expected_cells.sum())

    # The model saw bands 3, 2, 1 as R, G, B, each stretched between its 2nd and 98th percentile of valid pixels.
    valid = data[:, ~hole].astype(np.float64)
    rgb = np.empty((height, width, 3), np.uint8)
    for i, band in enumerate((2, 1, 0)):
        lo, hi = np.percentile(valid[band], (2, 98))
        rgb[..., i] = np.clip(np.round((data[band] - lo) * (255.0 / (hi - lo))), 0, 255)
    loaded = load_model(cfg)
    expected = Predictor(loaded.model, loaded.meta, device="cpu").predict([rgb])[0].mask
    agree = (mask == expected)[~hole].mean()
    assert agree > 0.99  # percentiles come from a decimated read of the whole image: a value or two apart


def test_vectors_are_geoparquet_polygons_whose_areas_add_up_to_the_class_pixels(tmp_path):
    (tmp_path / "in").mkdir()
    write_geotiff(tmp_path / "in" / "a.tif", 1500, 2500)
    Image.fromarray(scene(600, 800).transpose(1, 2, 0)).save(tmp_path / "in" / "b.png")
    checkpoint = pointwise_checkpoint(tmp_path / "pointwise.pt")
    tolerance = 1.0
    outputs = {"report": False, "vectors": True, "vector_tolerance": tolerance}
    cfg = job(tmp_path, tmp_path / "in", tmp_path / "out", checkpoint, outputs=outputs)
    run_in_process(cfg)

    rows = {r["image_id"]: r for r in rows_of(tmp_path / "out")}
    (part,) = (tmp_path / "out" / "vectors").iterdir()
    table = pq.read_table(part)
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["encoding"] == "WKB"
    assert geo["columns"]["geometry"]["crs"] is None  # a georeferenced and a plain image: no one CRS for the part
    polygons = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
    assert shapely.is_valid(polygons).all()

    sums = duckdb.sql(
        f"select image_id, class, sum(pixels) as pixels, sum(area) as area, count(*) as n "
        f"from read_parquet('{part}') group by image_id, class"
    ).fetchall()
    for image_id, cls, pixels, area, _ in sums:
        row = rows[image_id]
        pixel_area = 100.0 if row["crs"] else 1.0
        assert pixels == row["class_pixels"][cls]
        # Simplifying moves an outline by at most the tolerance: the area by at most perimeter x tolerance.
        mine = (table["image_id"].to_numpy(zero_copy_only=False) == image_id) & (table["class"].to_numpy() == cls)
        perimeter = float(shapely.length(polygons[mine]).sum())
        side = pixel_area**0.5
        assert abs(area - pixels * pixel_area) <= perimeter * tolerance * side
    assert {i for i, *_ in sums} == {"a.tif", "b.png"}
    bounds = rows["a.tif"]["bounds"]
    inside = polygons[table["image_id"].to_numpy(zero_copy_only=False) == "a.tif"]
    xmin, ymin, xmax, ymax = shapely.total_bounds(inside)
    assert (xmin, ymin, xmax, ymax) == pytest.approx((bounds["xmin"], bounds["ymin"], bounds["xmax"], bounds["ymax"]))

    # The report's gallery draws the GeoTIFF's tile from its COG mask and names its CRS and extent.
    fs, root = cfg.resolve(cfg.output_uri)
    write_report(fs, root, cfg.resolve)
    html = (tmp_path / "out" / "report.html").read_text()
    assert "EPSG:32633: 500,000.0, 5,985,000.0, 525,000.0, 6,000,000.0" in html
    assert "cannot be drawn" not in html and "image unreadable" not in html


@pytest.mark.s3
@pytest.mark.slow
def test_a_huge_tiff_on_s3_is_read_by_ranges_for_a_window_of_it(tmp_path, s3_server):
    size = 6_000
    rng = np.random.default_rng(3)
    local = tmp_path / "huge.tif"
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=CRS, transform=TRANSFORM)
    profile |= dict(tiled=True, blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="YES")
    with rasterio.open(local, "w", **profile) as ds:
        for top in range(0, size, 1000):  # noise: incompressible, so the file is as large as its pixels
            ds.write(rng.integers(0, 256, (3, 1000, size), dtype=np.uint8), window=((top, top + 1000), (0, size)))
    fs = s3_server.fs()
    bucket = "geo-ranges"
    fs.mkdir(bucket)
    fs.put_file(str(local), f"{bucket}/in/huge.tif")
    file_size = fs.size(f"{bucket}/in/huge.tif")
    checkpoint = pointwise_checkpoint(tmp_path / "pointwise.pt")
    cfg = job(
        tmp_path,
        f"s3://{bucket}/in",
        f"s3://{bucket}/out",
        checkpoint,
        storage=s3_server.storage_config(),
        input={"window": [2048, 3072, 700, 500]},
    )
    plan = plan_job(cfg)
    processor = ShardProcessor(plan.cfg, plan.run_id, torch_threads=2)
    in_fs = processor.source.fs
    ranges: list[int] = []
    call = in_fs._call_s3

    async def counted(method, *args, **kwargs):  # counts the GETs the job makes; the server answers them
        if method == "get_object" and kwargs.get("Key") == "in/huge.tif":
            start, end = kwargs.get("Range", f"bytes=0-{file_size - 1}")[6:].split("-")  # no range: all of it
            ranges.append(int(end) - int(start) + 1)
        return await call(method, *args, **kwargs)

    in_fs._call_s3 = counted
    try:
        summaries = [processor(shard) for shard in plan.pending]
    finally:
        del in_fs._call_s3
    finalize_job(plan, summaries, 1.0)

    assert [r["error"] for r in pq.read_table(f"{bucket}/out/stats", filesystem=fs).to_pylist()] == [None]
    assert 0 < sum(ranges) < file_size / 10, f"read {sum(ranges):,} of {file_size:,} bytes in {len(ranges)} GETs"
    out = s3_server.fs()
    with rasterio.open(out.open(f"{bucket}/out/masks/huge.tif.tif")) as ds:
        assert (ds.width, ds.height) == (700, 500)
        assert ds.transform == TRANSFORM @ rasterio.Affine.translation(2048, 3072)


def test_unreadable_tiffs_are_error_rows_and_the_run_goes_on(tmp_path):
    from rasterio.shutil import copy as rio_copy

    (tmp_path / "in").mkdir()
    write_geotiff(tmp_path / "in" / "good.tif", 600, 700)
    (tmp_path / "in" / "noise.tif").write_bytes(np.random.default_rng(1).bytes(50_000))
    noisy = np.random.default_rng(2).integers(0, 256, (3, 1500, 1500), dtype=np.uint8)  # incompressible blocks
    profile = dict(driver="GTiff", width=1500, height=1500, count=3, dtype="uint8")
    with rasterio.open(tmp_path / "big.tif", "w", **profile) as ds:
        ds.write(noisy)
    rio_copy(tmp_path / "big.tif", tmp_path / "cog.tif", driver="COG")  # its IFDs first: it opens when cut
    data = (tmp_path / "cog.tif").read_bytes()
    (tmp_path / "in" / "cut.tif").write_bytes(data[: len(data) * 2 // 5])
    checkpoint = pointwise_checkpoint(tmp_path / "pointwise.pt")
    cfg = job(tmp_path, tmp_path / "in", tmp_path / "out", checkpoint, outputs={"report": False, "vectors": True})
    cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"tile": (256, 256)})})
    done = run_in_process(cfg)

    rows = {r["image_id"]: r for r in rows_of(tmp_path / "out")}
    assert rows["good.tif"]["error"] is None
    assert rows["noise.tif"]["error_kind"] == "input" and rows["noise.tif"]["error"].startswith("cannot read TIFF")
    assert rows["cut.tif"]["error_kind"] == "input" and rows["cut.tif"]["error"].startswith("cannot read this image")
    assert done["manifest"]["status"] == "complete"
    masks = sorted(p.name for p in (tmp_path / "out" / "masks").iterdir())
    assert masks == ["good.tif.tif"]  # nothing of the failed ones, no temporary left behind
    assert set(pq.read_table(tmp_path / "out" / "vectors")["image_id"].to_pylist()) == {"good.tif"}


def test_an_increment_rewrites_the_polygons_of_a_part_whose_images_left(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a", "b", "c"):
        write_geotiff(tmp_path / "in" / f"{name}.tif", 300, 400)
    checkpoint = pointwise_checkpoint(tmp_path / "pointwise.pt")
    out = tmp_path / "out"
    fields = dict(mode="incremental", prune_deleted=True, outputs={"report": False, "vectors": True})
    run_in_process(job(tmp_path, tmp_path / "in", out, checkpoint, **fields))
    (first,) = (out / "vectors").iterdir()
    assert set(pq.read_table(first)["image_id"].to_pylist()) == {"a.tif", "b.tif", "c.tif"}

    (tmp_path / "in" / "b.tif").unlink()
    done = run_in_process(job(tmp_path, tmp_path / "in", out, checkpoint, **fields))
    parts = [out / "vectors" / f"part-{s['shard_id']}.parquet" for s in done["manifest"]["shards"]]
    assert sorted(p.name for p in (out / "vectors").iterdir()) == sorted(p.name for p in parts)  # the old one gone
    table = pq.read_table(parts)
    assert set(table["image_id"].to_pylist()) == {"a.tif", "c.tif"}
    assert b"geo" in pq.read_schema(parts[0]).metadata  # still GeoParquet
    assert not (out / "masks" / "b.tif.tif").exists()


def test_input_bounds_segment_the_area_of_interest_in_the_images_crs(tmp_path):
    (tmp_path / "in").mkdir()
    write_geotiff(tmp_path / "in" / "a.tif", 400, 600)  # 500,000-506,000 E, 5,996,000-6,000,000 N
    (tmp_path / "in" / "far.tif").write_bytes((tmp_path / "in" / "a.tif").read_bytes())
    with rasterio.open(tmp_path / "in" / "far.tif", "r+") as ds:
        ds.transform = from_origin(700_000, 6_000_000, 10, 10)  # elsewhere: the area is not in it
    checkpoint = pointwise_checkpoint(tmp_path / "pointwise.pt")
    aoi = [501_005.0, 5_997_000.0, 503_000.0, 5_998_995.0]
    run_in_process(job(tmp_path, tmp_path / "in", tmp_path / "out", checkpoint, input={"bounds": aoi}))

    rows = {r["image_id"]: r for r in rows_of(tmp_path / "out")}
    # The pixels covering the area, rounded outwards to whole pixels: columns 100-299, rows 100-299.
    assert rows["a.tif"]["bounds"] == {"xmin": 501_000, "ymin": 5_997_000, "xmax": 503_000, "ymax": 5_999_000}
    assert (rows["a.tif"]["width"], rows["a.tif"]["height"]) == (200, 200)
    with rasterio.open(tmp_path / "out" / "masks" / "a.tif.tif") as ds:
        assert ds.transform == from_origin(501_000, 5_999_000, 10, 10) and ds.shape == (200, 200)
    assert rows["far.tif"]["error_kind"] == "input" and "do not overlap" in rows["far.tif"]["error"]


def test_tiff_bytes_inside_a_parquet_shard_are_read_by_windows_too(tmp_path):
    import pyarrow as pa

    write_geotiff(tmp_path / "a.tif", 300, 500)
    (tmp_path / "in").mkdir()
    tiff = (tmp_path / "a.tif").read_bytes()
    pq.write_table(pa.table({"image": [tiff, b"not an image"]}), tmp_path / "in" / "scenes.parquet")
    checkpoint = pointwise_checkpoint(tmp_path / "pointwise.pt")
    cfg = job(tmp_path, tmp_path / "in", tmp_path / "out", checkpoint)
    cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"tile": (128, 128)})})
    run_in_process(cfg)

    rows = sorted(rows_of(tmp_path / "out"), key=lambda r: r["image_id"])
    assert rows[0]["crs"] == CRS and rows[0]["error"] is None and rows[0]["mask_uri"].endswith(".tif")
    assert rows[1]["error_kind"] == "input"
    with rasterio.open(rows[0]["mask_uri"]) as ds:
        assert ds.transform == TRANSFORM and ds.shape == (300, 500)


def test_training_reads_a_tiff_as_a_job_does(tmp_path):
    from pipeline.config import DataConfig, TrainConfig
    from pipeline.train import load_labeled

    (tmp_path / "in").mkdir()
    (tmp_path / "labels").mkdir()
    data = np.random.default_rng(5).integers(0, 4000, (4, 120, 160)).astype(np.uint16)
    profile = dict(driver="GTiff", width=160, height=120, count=4, dtype="uint16", crs=CRS, transform=TRANSFORM)
    with rasterio.open(tmp_path / "in" / "s.tif", "w", **profile) as ds:
        ds.write(data)
    Image.fromarray(np.zeros((120, 160), np.uint8)).save(tmp_path / "labels" / "s.png")
    source = DataConfig(
        input_uri=str(tmp_path / "in"),
        labels_uri=str(tmp_path / "labels"),
        input={"bands": [4, 3, 2], "scale": "fixed", "scale_range": [0, 4000]},
    )
    cfg = TrainConfig(class_names=["a", "b"], train=source, val=source, output_uri=str(tmp_path / "m.pt"))
    ((image, label),) = load_labeled(cfg, source, 2)
    expected = np.clip(np.round(data[[3, 2, 1]].astype(np.float64) * 255 / 4000), 0, 255).astype(np.uint8)
    assert np.array_equal(image, expected.transpose(1, 2, 0)) and label.shape == (120, 160)
