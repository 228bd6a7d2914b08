"""The manifest layout: parsing (columns, headers, URL-encoded inventory keys, relative paths, the base folder)
on local disk, then jobs over the real local S3 server whose rows, masks and metrics equal a files-layout run's."""

from __future__ import annotations

import gzip
import io
import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote_plus

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.config import InputConfig, load_config
from pipeline.errors import ConfigError, InputError
from pipeline.sources import Shard, shard_id_for
from pipeline.sources import manifest as m
from pipeline.sources.layout import detect_layout

LOCAL = fsspec.filesystem("file")
S3 = s3fs.S3FileSystem(anon=True, skip_instance_cache=True)  # for its URI handling only: nothing is fetched
LAYOUT = m.ManifestLayout()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def parquet_bytes(columns: dict) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def planned(root: Path | str, shard_size: int = 2) -> list[Shard]:
    return list(LAYOUT.plan(LOCAL, str(root), InputConfig(layout="manifest"), shard_size))


# --- parsing ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first_row", "expected"),
    [
        (["uri", "size", "etag"], (["uri", "size", "etag"], True)),
        (["Bucket", " Key", "Size"], (["Bucket", " Key", "Size"], True)),  # any case, spaces around
        (["s3://b/x.jpg", "12", "abc"], (["uri", "column_1", "column_2"], False)),
        (["imgs/x.jpg"], (["uri"], False)),  # one field: a path
        (
            ["b", "imgs/x.jpg", "12", "2026-01-01", "abc"],
            (["bucket", "key", "column_2", "column_3", "column_4"], False),
        ),
    ],
)
def test_a_header_is_a_first_row_with_a_known_column_name(first_row, expected):
    assert m.csv_columns(first_row) == expected


def test_columns_are_found_by_name_in_any_case_and_a_uri_wins_over_bucket_and_key():
    assert m.columns_for(["URL", "Size", "ETag"]) == {"uri": "URL", "size": "Size", "etag": "ETag"}
    assert m.columns_for(["bucket", "key", "size", "e_tag"]) == {
        "bucket": "bucket",
        "key": "key",
        "size": "size",
        "etag": "e_tag",
    }
    assert m.columns_for(["path", "bucket", "key"]) == {"uri": "path"}
    assert m.columns_for(["bucket", "size"]) is None
    assert m.columns_for(["name", "bytes"]) is None


@pytest.mark.parametrize(
    ("low", "high", "folder"),
    [
        ("s3://b/imgs/x/a.jpg", "s3://b/imgs/y.jpg", "s3://b/imgs/"),
        ("s3://b/imgs/a.jpg", "s3://b/imgs/a.jpg", "s3://b/imgs/"),  # one image: its folder
        ("s3://b/imgs/ab.jpg", "s3://b/imgs/ac.jpg", "s3://b/imgs/"),  # a common name prefix is no folder
        ("s3://a/x.jpg", "s3://b/y.jpg", "s3://"),  # two buckets: ids begin with the bucket
    ],
)
def test_the_base_is_the_longest_common_folder(low, high, folder):
    assert m.common_folder(low, high) == folder


@pytest.mark.parametrize("fs", [S3, LOCAL], ids=["s3", "local"])
def test_normalising_a_column_equals_normalising_each_value(fs):
    values = [
        "s3://b/imgs/a.jpg",
        "s3a://b/imgs/b.jpg",
        "s3://b/imgs/c.jpg/",
        "s3://top.jpg",
        "file:///data/imgs/a.jpg",
        "local:///data/imgs/b.jpg",
        "gs://other/x.jpg",
        "imgs/x.jpg",
        "bare.jpg",
        "../up/x.jpg",
        "/abs/x.jpg",
        "imgs/./x.jpg",
        "imgs/.",
        "imgs//x.jpg",
        None,
    ]
    normalise = m.Normaliser(fs, "/manifests" if fs is LOCAL else "bucket/manifests")
    assert normalise.column(pa.array(values, pa.string())).to_pylist() == [v and normalise(v) for v in values]


def test_uris_are_normalised_as_the_files_layout_writes_them():
    s3 = m.Normaliser(S3, "bucket/manifests")
    assert s3("s3a://b/imgs/a.jpg") == "s3://b/imgs/a.jpg"
    assert s3("../imgs/a.jpg") == "s3://bucket/imgs/a.jpg"  # relative to the manifest's folder
    assert s3("gs://b/a.jpg") == "gs://b/a.jpg"  # another store's: kept, read makes it an error row
    local = m.Normaliser(LOCAL, "/data/lists")
    assert local("a.jpg") == "file:///data/lists/a.jpg"
    assert local("/data/imgs/a.jpg") == "file:///data/imgs/a.jpg"


def test_inventory_csv_keys_are_url_decoded_and_objects_that_are_no_images_skipped():
    keys = pa.array(["imgs%2Fwith+space%2Fa.jpg", "imgs/100%25.png", "imgs/", "imgs/notes.txt", None])
    buckets = pa.array(["b"] * len(keys))
    assert m._object_uris(buckets, keys, "s3://", decode=True).to_pylist() == [
        "s3://b/imgs/with space/a.jpg",
        "s3://b/imgs/100%.png",
        None,
        None,
        None,
    ]
    assert m._object_uris(buckets, keys, "s3://", decode=False).to_pylist()[0] == "s3://b/imgs%2Fwith+space%2Fa.jpg"


# --- planning and reading on local disk --------------------------------------------------------------------------


def test_plan_cuts_consecutive_rows_in_manifest_order_and_skips_empty_ones(tmp_path, caplog):
    rows = ["uri,size,etag", "imgs/b.jpg,10,e1", "imgs/a.jpg,11,e2", ",12,e3", "imgs/c/d.png,13,e4"]
    csv_path = write(tmp_path / "list.csv", "\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        shards = planned(csv_path)
    uris = [f"file://{tmp_path}/imgs/{name}" for name in ("b.jpg", "a.jpg", "c/d.png")]
    assert shards == [
        Shard(
            shard_id_for(0, *uris[:2]), items=tuple(uris[:2]), images=2, versions=("etag:e1", "etag:e2"), sizes=(10, 11)
        ),
        Shard(shard_id_for(1, uris[2]), items=(uris[2],), images=1, versions=("etag:e4",), sizes=(13,)),
    ]
    assert "skipped 1 rows naming no image" in caplog.text


def test_a_shard_has_versions_only_when_every_row_has_an_etag_and_sizes_may_be_unknown(tmp_path):
    path = write(tmp_path / "m.parquet", parquet_bytes({"uri": ["a.jpg", "b.jpg"], "etag": ['"q"', None]}))
    [shard] = planned(path)
    assert shard.versions == () and shard.sizes == (None, None)
    write(tmp_path / "q" / "m.csv", 'uri,ETag\na.jpg,"""quoted"""\n')
    assert planned(tmp_path / "q")[0].versions == ("etag:quoted",)  # as content_version strips S3's quotes


def test_a_folder_is_its_manifests_sorted_by_path_without_hidden_or_underscore_files(tmp_path):
    write(tmp_path / "b.csv", "uri\nb.jpg\n")
    write(tmp_path / "a" / "x.csv.gz", gzip.compress(b"a.jpg\n"))  # headerless, gzipped
    write(tmp_path / "c.parquet", parquet_bytes({"URI": ["c.jpg"]}))
    write(tmp_path / "_temporary" / "d.csv", "uri\nd.jpg\n")
    write(tmp_path / ".e.csv", "uri\ne.jpg\n")
    write(tmp_path / "notes.txt", "not a manifest")
    items = [uri for shard in planned(tmp_path, 10) for uri in shard.items]
    assert items == [f"file://{tmp_path}/{p}" for p in ("a/a.jpg", "b.jpg", "c.jpg")]


def test_a_manifest_without_a_usable_column_names_its_columns(tmp_path):
    path = write(tmp_path / "list.parquet", parquet_bytes({"name": ["a.jpg"], "bytes": [1]}))
    with pytest.raises(InputError, match=f"^file://{path}: no column of image URIs .* its columns: name, bytes$"):
        planned(path)
    path = write(tmp_path / "list.csv", "Bucket,Size\nb,1\n")  # a header (known names), but no key
    with pytest.raises(InputError, match="its columns: Bucket, Size$"):
        planned(path)
    with pytest.raises(InputError, match="a manifest is a Parquet, CSV"):
        planned(write(tmp_path / "list.txt", "uri\na.jpg\n"))


def test_resolve_computes_the_base_from_the_manifest_or_normalises_the_one_given(tmp_path):
    path = write(tmp_path / "m.csv", "uri\nimgs/x/a.jpg\nimgs/y.jpg\ngs://elsewhere/z.jpg\n")
    assert LAYOUT.resolve(LOCAL, str(path), InputConfig()).base_uri == f"file://{tmp_path}/imgs/"
    given = InputConfig(base_uri=str(tmp_path / "imgs" / "x"))
    assert LAYOUT.resolve(LOCAL, str(path), given).base_uri == f"file://{tmp_path}/imgs/x/"
    with pytest.raises(ConfigError, match="input.base_uri gs://b/imgs: not on the manifest's store"):
        LAYOUT.resolve(LOCAL, str(path), InputConfig(base_uri="gs://b/imgs"))
    with pytest.raises(InputError, match="the manifest lists no image on file://"):
        LAYOUT.resolve(LOCAL, str(write(tmp_path / "empty.csv", "uri\n")), InputConfig())


def test_read_gives_ids_under_the_base_and_error_samples_for_the_rest(tmp_path):
    write(tmp_path / "imgs" / "x" / "a.jpg", b"A")
    uris = [f"file://{tmp_path}/imgs/x/a.jpg", f"file://{tmp_path}/imgs/gone.jpg", f"file://{tmp_path}/other/b.jpg"]
    shard = Shard("s", items=(*uris, "gs://b/c.jpg"))
    cfg = InputConfig(layout="manifest", base_uri=f"file://{tmp_path}/imgs/")
    with ThreadPoolExecutor(2) as pool:
        got = list(LAYOUT.read(LOCAL, str(tmp_path / "m.csv"), shard, cfg, pool))
    assert [(s.image_id, s.name, s.source_uri, s.image) for s in got[:2]] == [
        ("x/a.jpg", "x/a.jpg", uris[0], b"A"),
        ("gone.jpg", "gone.jpg", uris[1], None),  # the row says "missing file"
    ]
    assert got[2].image_id == f"file/{str(tmp_path).strip('/')}/other/b.jpg" and got[2].image is None
    assert "is not under input.base_uri" in got[2].error
    assert got[3].image_id == "gs/b/c.jpg" and "is not on the manifest's store (file://)" in got[3].error


@pytest.mark.parametrize(
    ("rel", "layout"),
    [
        ("lists/images.csv", "manifest"),
        ("lists/images.CSV.GZ", "manifest"),
        ("inv/manifest.json", "manifest"),
        ("inv/images.parquet", "parquet"),  # a Parquet manifest needs input.layout: manifest
    ],
)
def test_a_single_manifest_file_is_detected(tmp_path, rel, layout):
    assert detect_layout(LOCAL, str(write(tmp_path / rel, ""))) == layout


def test_a_folder_of_csv_files_or_with_an_inventory_manifest_is_detected(tmp_path):
    write(tmp_path / "csv" / "part-0.csv", "")
    write(tmp_path / "inventory" / "manifest.json", "{}")
    write(tmp_path / "inventory" / "manifest.checksum", "")
    assert detect_layout(LOCAL, str(tmp_path / "csv")) == "manifest"
    assert detect_layout(LOCAL, str(tmp_path / "inventory")) == "manifest"


# --- jobs against the local S3 server ------------------------------------------------------------------------------

IMAGE_COUNT = 6  # with shard_size 2: three shards
COMPARED = ["image_id", "source_uri", "class_pixels", "labeled", "error", "error_kind"]


@pytest.fixture(scope="module")
def bucket(s3_server, dataset) -> dict:
    """The first images of the dataset under imgs/ (one in a folder with a space), their labels under labels/,
    and the objects as an inventory lists them (key, size, etag), in an order that is not sorted."""
    fs = s3_server.fs()
    name = f"segpipe-manifest-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    images = sorted((dataset / "images").rglob("*.*"))[:IMAGE_COUNT]
    objects = []
    for n, image in enumerate(images):
        rel = image.relative_to(dataset / "images").as_posix()
        rel = rel if n else f"with space/{Path(rel).name}"
        fs.pipe(f"{name}/imgs/{rel}", image.read_bytes())
        label = (dataset / "labels" / image.relative_to(dataset / "images")).with_suffix(".png")
        fs.pipe(f"{name}/labels/{Path(rel).with_suffix('.png').as_posix()}", label.read_bytes())
        info = fs.info(f"{name}/imgs/{rel}")
        objects.append((f"imgs/{rel}", info["size"], info["ETag"].strip('"')))
    return {"name": name, "objects": objects[::-1]}


def run_job(s3_server, checkpoint, tmp_path, input_uri: str, bucket: str, **fields) -> tuple[list[dict], dict, dict]:
    """Plan, run inline and finalize a job into a fresh local output: its rows sorted by id, masks and metrics."""
    from pipeline.execution import run_inline
    from pipeline.job import finalize_job, plan_job

    out = tmp_path / f"out-{uuid.uuid4().hex[:6]}"
    cfg = load_config(
        None,
        input_uri=input_uri,
        labels_uri=f"s3://{bucket}/labels",
        output_uri=str(out),
        checkpoint_uri=str(checkpoint),
        shard_size=2,
        storage=s3_server.storage_config(),
        **fields,
    )
    plan = plan_job(cfg)
    result = finalize_job(plan, run_inline(plan.cfg, plan.run_id, plan.pending), 1.0)
    rows = pq.read_table(sorted((out / "stats").glob("part-*.parquet"))).sort_by("image_id").to_pylist()
    masks = {r["image_id"]: Path(r["mask_uri"].removeprefix("file://")).read_bytes() for r in rows if r["mask_uri"]}
    metrics = {k: v for k, v in result["metrics"].items() if k != "run_id"}
    return [{k: r[k] for k in COMPARED} for r in rows], masks, metrics


@pytest.fixture(scope="module")
def listed(s3_server, checkpoint, bucket, tmp_path_factory):
    """The files layout's run over the same objects: what every manifest run must give."""
    return run_job(
        s3_server, checkpoint, tmp_path_factory.mktemp("files"), f"s3://{bucket['name']}/imgs", bucket["name"]
    )


def parquet_of_uris(fs, name: str, objects: list) -> tuple[str, dict]:
    fs.pipe(f"{name}/m/a/images.parquet", parquet_bytes({"uri": [f"s3://{name}/{key}" for key, _, _ in objects]}))
    return f"s3://{name}/m/a/images.parquet", {"input": {"layout": "manifest"}}


def csv_with_header(fs, name: str, objects: list) -> tuple[str, dict]:
    """Paths relative to the manifest's folder, auto-detected by the .csv suffix."""
    lines = ["uri,size,etag", *(f'"../../{key}",{size},{etag}' for key, size, etag in objects)]
    fs.pipe(f"{name}/m/b/images.csv", "\n".join(lines).encode())
    return f"s3://{name}/m/b/images.csv", {}


def inventory_csv(fs, name: str, objects: list) -> tuple[str, dict]:
    """S3 Inventory as it writes CSV: gzipped, headerless, quoted, keys URL-encoded; a folder marker and a
    non-image among the objects. The input is the folder holding manifest.json, auto-detected."""
    listed = [("imgs/", 0, "d41d8cd98f00b204e9800998ecf8427e"), ("imgs/notes.txt", 5, "x"), *objects]
    rows = [f'"{name}","{quote_plus(key)}","{size}","2026-12-01T00:00:00.000Z","{etag}"' for key, size, etag in listed]
    fs.pipe(f"{name}/inventory/data/c.csv.gz", gzip.compress("\n".join(rows).encode()))
    doc = inventory_doc(name, "CSV", "Bucket, Key, Size, LastModifiedDate, ETag", "inventory/data/c.csv.gz")
    fs.pipe(f"{name}/inventory/c/2026-12-01T00-00Z/manifest.json", json.dumps(doc).encode())
    return f"s3://{name}/inventory/c/2026-12-01T00-00Z", {}


def inventory_doc(name: str, fmt: str, schema: str, data_key: str) -> dict:
    """An S3 Inventory manifest.json naming one data file in bucket ``name``."""
    return {
        "sourceBucket": name,
        "destinationBucket": f"arn:aws:s3:::{name}",
        "fileFormat": fmt,
        "fileSchema": schema,
        "files": [{"key": data_key, "size": 1, "MD5checksum": "0"}],
    }


def inventory_parquet(fs, name: str, objects: list) -> tuple[str, dict]:
    """S3 Inventory as it writes Parquet: keys as they are, e_tag; the input is its manifest.json."""
    columns = {"bucket": [name] * len(objects), "key": [k for k, _, _ in objects]}
    columns |= {"size": [s for _, s, _ in objects], "e_tag": [e for _, _, e in objects]}
    fs.pipe(f"{name}/inventory/data/d.parquet", parquet_bytes(columns))
    schema = "message s3.inventory { required binary bucket (STRING); required binary key (STRING); }"
    doc = inventory_doc(name, "Parquet", schema, "inventory/data/d.parquet")
    fs.pipe(f"{name}/inventory/d/manifest.json", json.dumps(doc).encode())
    return f"s3://{name}/inventory/d/manifest.json", {}


@pytest.mark.s3
@pytest.mark.parametrize("make", [parquet_of_uris, csv_with_header, inventory_csv, inventory_parquet])
def test_a_manifest_run_equals_the_files_run_over_the_same_objects(
    s3_server, checkpoint, bucket, listed, tmp_path, make
):
    input_uri, fields = make(s3_server.fs(), bucket["name"], bucket["objects"])
    rows, masks, metrics = run_job(s3_server, checkpoint, tmp_path, input_uri, bucket["name"], **fields)
    assert len(rows) == IMAGE_COUNT and any(r["image_id"].startswith("with space/") for r in rows)
    assert all(r["error"] is None and r["labeled"] for r in rows)
    assert (rows, masks, metrics) == listed


@pytest.mark.s3
def test_a_missing_object_and_one_outside_the_base_are_error_rows_and_the_run_goes_on(
    s3_server, checkpoint, bucket, tmp_path
):
    name = bucket["name"]
    keys = [key for key, _, _ in bucket["objects"]]
    inside = next(k for k in keys if not k.startswith("imgs/with space/"))
    outside = next(k for k in keys if k.startswith("imgs/with space/"))
    uris = [f"s3://{name}/{k}" for k in (inside, "imgs/000/gone.jpg", outside)]
    s3_server.fs().pipe(f"{name}/m/e/list.csv", "\n".join(["uri", *uris]).encode())
    base = {"input": {"base_uri": f"s3://{name}/imgs/000"}}
    rows, masks, metrics = run_job(s3_server, checkpoint, tmp_path, f"s3://{name}/m/e/list.csv", name, **base)
    by_id = {r["image_id"]: r for r in rows}
    assert by_id[inside.removeprefix("imgs/000/")]["error"] is None
    assert by_id["gone.jpg"]["error"].startswith("missing file")
    assert f"is not under input.base_uri s3://{name}/imgs/000/" in by_id[f"s3/{name}/{outside}"]["error"]
    assert list(masks) == [inside.removeprefix("imgs/000/")] and metrics["errors"] == 2


def test_a_manifest_without_a_usable_column_stops_the_job_before_any_work(tmp_path, checkpoint):
    from pipeline.job import plan_job

    path = write(tmp_path / "list.csv", "key,size\na.jpg,1\n")
    cfg = load_config(None, input_uri=str(path), output_uri=str(tmp_path / "out"), checkpoint_uri=str(checkpoint))
    with pytest.raises(InputError, match="no column of image URIs .* its columns: key, size$"):
        plan_job(cfg)
    assert not (tmp_path / "out").exists()
