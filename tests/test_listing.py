"""Listing folder by folder (``iter_files``): the flat ``find``'s result and order, streamed, on a local disk and
on a real S3 server; shards cut as it streams; layout detection that stops at the first image."""

from __future__ import annotations

import inspect
import json
import threading
import uuid

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import InputConfig
from pipeline.errors import InputError
from pipeline.images import IMAGE_EXTENSIONS
from pipeline.sources import files
from pipeline.sources.base import InputFile, content_version
from pipeline.sources.layout import InputSource, detect_layout
from pipeline.sources.listing import AHEAD_PER_THREAD, LISTING_THREADS, iter_files, list_files

# Names whose order tells a per-folder sort from the global one: "a-b.jpg" < "a/..." < "a0.jpg" ("-" < "/" < "0"),
# "a!b.jpg" sorts before everything under "a.b/", upper case before lower, unicode after ASCII.
WANTED = [
    "a.jpg", "a/b.jpg", "a/a.PNG", "a/c/d.jpg", "a-b.jpg", "a0.jpg", "A.jpg", "a!b.jpg", "a.b/c.jpg", "a b/x.jpeg",
    "ä.jpg", "日本/画像.jpg", "z.JPG", "Z.TIFF", "x.jpg/inner.jpg", "deep/1/2/3/4/e.png", "deep/1/f.webp",
]  # fmt: skip
UNWANTED = [".hidden.jpg", ".git/x.jpg", "b/.cache/y.png", "b/.z.jpg", "notes.txt", "b/readme.md", "a.jpg.bak"]
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tiff")


def find_based(fs, root: str, suffixes: tuple[str, ...], ignore: tuple[str, ...] = (".",)) -> list[InputFile]:
    """What ``list_files`` gave before: one flat ``find``, filtered, sorted by path. The reference."""
    prefix = root.rstrip("/") + "/"
    found = []
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(prefix) :]
        if rel.lower().endswith(suffixes) and not any(part.startswith(ignore) for part in rel.split("/")):
            found.append(InputFile(rel, info["size"], content_version(info)))
    return sorted(found, key=lambda f: f.path)


def write_local(root, rels, data: bytes = b"x") -> str:
    for rel in rels:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(root)


class CountingFS(LocalFileSystem):
    """The local filesystem, noting every folder it lists."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.listed: list[str] = []
        self._lock = threading.Lock()

    def ls(self, path, detail=False, **kwargs):
        with self._lock:
            self.listed.append(path)
        return super().ls(path, detail=detail, **kwargs)


LOCAL = fsspec.filesystem("file")


# --- a local disk ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 2, 4, 64])
def test_the_walk_lists_what_find_lists_in_its_order(tmp_path, concurrency):
    root = write_local(tmp_path / "in", WANTED + UNWANTED)
    expected = find_based(LOCAL, root, SUFFIXES)
    assert [f.path for f in expected] == sorted(WANTED)
    assert list(iter_files(LOCAL, root, SUFFIXES, concurrency=concurrency)) == expected


def test_suffixes_match_in_any_case_and_ignore_prefixes_skip_files_and_folders(tmp_path):
    root = write_local(tmp_path / "in", ["a.JPG", "b.Jpg", "c.jpg", "_tmp/d.jpg", "_e.jpg", "f/.g.jpg", "h.png"])
    assert [f.path for f in iter_files(LOCAL, root, (".jpg",))] == ["_e.jpg", "_tmp/d.jpg", "a.JPG", "b.Jpg", "c.jpg"]
    skipping = iter_files(LOCAL, root, (".jpg",), ignore_prefixes=(".", "_"))
    assert [f.path for f in skipping] == ["a.JPG", "b.Jpg", "c.jpg"]
    assert [f.path for f in iter_files(LOCAL, root, (".jpg",), ignore_prefixes=())] == [
        "_e.jpg", "_tmp/d.jpg", "a.JPG", "b.Jpg", "c.jpg", "f/.g.jpg"
    ]  # fmt: skip


def test_a_suffix_starting_with_a_slash_is_a_whole_name(tmp_path):
    root = write_local(tmp_path / "in", ["manifest.json", "sub/manifest.json", "old-manifest.json"])
    assert [f.path for f in iter_files(LOCAL, root, ("/manifest.json",))] == ["manifest.json", "sub/manifest.json"]


def test_a_root_that_is_a_file_lists_as_its_basename(tmp_path):
    write_local(tmp_path, ["one.jpg", "notes.txt"])
    [f] = iter_files(LOCAL, str(tmp_path / "one.jpg"), (".jpg",))
    assert f == InputFile("one.jpg", 1, content_version(LOCAL.info(str(tmp_path / "one.jpg"))))
    assert list(iter_files(LOCAL, str(tmp_path / "notes.txt"), (".jpg",))) == []  # a file of no suffix: nothing


def test_a_missing_root_lists_nothing_as_find_did(tmp_path):
    missing = str(tmp_path / "missing")
    assert find_based(LOCAL, missing, SUFFIXES) == []
    assert list(iter_files(LOCAL, missing, SUFFIXES)) == [] == list_files(LOCAL, missing, SUFFIXES)


def test_list_files_and_list_inputs_are_the_walk(tmp_path):
    root = write_local(tmp_path / "in", WANTED + UNWANTED)
    assert list_files(LOCAL, root, SUFFIXES) == find_based(LOCAL, root, SUFFIXES)
    assert files.list_inputs(LOCAL, root) == find_based(LOCAL, root, IMAGE_EXTENSIONS)


def test_the_walk_streams_a_folder_at_a_time(tmp_path):
    """The first file comes before most folders are listed: the look-ahead is bounded, not the whole tree."""
    root = write_local(tmp_path / "in", [f"d{i:03d}/img.jpg" for i in range(200)])
    fs = CountingFS(skip_instance_cache=True)
    walk = iter_files(fs, root, (".jpg",))
    assert next(walk).path == "d000/img.jpg"
    assert len(fs.listed) <= 2 + AHEAD_PER_THREAD * LISTING_THREADS < 200
    walk.close()


# --- shards cut as the listing streams --------------------------------------------------------------------------------


@pytest.mark.parametrize("shard_size", [1, 3, 100])
def test_plan_streams_the_shards_make_shards_cuts_from_the_whole_listing(tmp_path, shard_size):
    root = write_local(tmp_path / "in", WANTED + UNWANTED)
    listed = files.list_inputs(LOCAL, root)
    planned = files.plan(LOCAL, root, shard_size)
    assert inspect.isgenerator(planned)
    planned = list(planned)
    cut = files.make_shards([f.path for f in listed], shard_size)
    assert [(s.shard_id, s.items, s.images) for s in planned] == [(s.shard_id, s.items, s.images) for s in cut]
    by_path = {f.path: f for f in listed}
    for s in planned:
        assert s.versions == tuple(by_path[p].version for p in s.items)
        assert s.sizes == tuple(by_path[p].size for p in s.items)


def test_plan_gives_its_first_shard_before_the_input_is_listed(tmp_path):
    root = write_local(tmp_path / "in", [f"d{i:03d}/img{j}.png" for i in range(200) for j in range(2)])
    fs = CountingFS(skip_instance_cache=True)
    planned = files.plan(fs, root, 2)
    assert next(planned).items == ("d000/img0.png", "d000/img1.png")
    assert len(fs.listed) < 200
    planned.close()


def test_plan_rejects_a_bad_shard_size(tmp_path):
    with pytest.raises(ValueError, match="shard_size"):
        next(files.plan(LOCAL, str(tmp_path), 0))


# --- layout detection -------------------------------------------------------------------------------------------------


def test_detection_stops_at_the_first_image(tmp_path):
    rels = ["a/img.png"] + [f"t{i:03d}/s.tar" for i in range(200)]
    fs = CountingFS(skip_instance_cache=True)
    assert detect_layout(fs, write_local(tmp_path / "in", rels)) == "files"
    assert len(fs.listed) <= 2 + AHEAD_PER_THREAD * LISTING_THREADS < 201


def test_detection_lists_to_the_end_when_no_image_is_there(tmp_path):
    rels = [f"t{i:03d}/s.tar" for i in range(20)] + ["z/p.parquet"]
    fs = CountingFS(skip_instance_cache=True)
    assert detect_layout(fs, write_local(tmp_path / "in", rels)) == "webdataset"
    assert len(fs.listed) == 1 + 21


def test_a_loose_folder_is_listed_once_to_detect_and_once_to_plan(tmp_path):
    """Detection of loose images stops at the first one: planning then lists the folder itself, for nothing."""
    fs = CountingFS(skip_instance_cache=True)
    root = write_local(tmp_path / "in", [f"img_{i}.png" for i in range(5)])
    source = InputSource(fs, root, InputConfig())
    assert source.layout == "files" and fs.listed == [root]
    assert [len(s.items) for s in source.plan(2)] == [2, 2, 1]
    assert fs.listed == [root, root]


@pytest.mark.parametrize(
    ("rels", "layout"),
    [
        (["x/a.png", "s/b.tar", "t/c.parquet"], "files"),
        (["s/b.TAR", "t/c.parquet", "notes.txt"], "webdataset"),
        (["t/c.parquet", ".hidden.png", ".cache/d.png"], "parquet"),
        (["s/a.tar.gz", "s/b.tgz"], "webdataset"),
    ],
)
def test_detection_results_are_unchanged(tmp_path, rels, layout):
    assert detect_layout(LOCAL, write_local(tmp_path / "in", rels)) == layout


def test_detection_errors_are_unchanged(tmp_path):
    root = write_local(tmp_path / "in", ["notes.txt", ".hidden.png"])
    with pytest.raises(InputError, match=f"^input {root} holds no images"):
        detect_layout(LOCAL, root)
    with pytest.raises(InputError, match="holds no images"):
        detect_layout(LOCAL, str(tmp_path / "missing"))


# --- a real S3 server -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_tree(s3_server) -> tuple[str, str]:
    """The tricky tree in a fresh bucket, with zero-byte folder markers (keys ending in "/") as consoles make
    them: ``(bucket, root)``."""
    fs = s3_server.fs()
    bucket = f"listing-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    root = f"{bucket}/in"
    fs.pipe({f"{root}/{rel}": b"x" * (i + 1) for i, rel in enumerate(WANTED + UNWANTED)})
    for marker in ("in/", "in/a/", "in/empty/"):
        fs.call_s3("put_object", Bucket=bucket, Key=marker, Body=b"")
    return bucket, root


@pytest.mark.s3
@pytest.mark.parametrize("concurrency", [1, 4, 64])
def test_on_s3_the_walk_lists_what_find_lists_in_its_order(s3_server, s3_tree, concurrency):
    _, root = s3_tree
    expected = find_based(s3_server.fs(), root, SUFFIXES)
    assert [f.path for f in expected] == sorted(WANTED)
    assert all(f.version.startswith("etag:") for f in expected)
    fs = s3_server.fs()
    assert list(iter_files(fs, root, SUFFIXES, concurrency=concurrency)) == expected
    assert dict(fs.dircache) == {}  # no listing kept: at 100M objects that is gigabytes


@pytest.mark.s3
@pytest.mark.parametrize("concurrency", [1, 16])
def test_obstore_lists_what_s3fs_lists(s3_server, s3_tree, concurrency):
    """storage.client: obstore lists folders in Rust: the same entries, sizes and ETags, the same walk."""
    from pipeline.obstore_s3 import ObstoreS3FileSystem

    bucket, root = s3_tree
    fs = ObstoreS3FileSystem(
        endpoint_url=s3_server.endpoint, key=s3_server.key, secret=s3_server.secret, skip_instance_cache=True
    )
    expected = find_based(s3_server.fs(), root, SUFFIXES)
    assert list(iter_files(fs, root, SUFFIXES, concurrency=concurrency)) == expected
    for folder in (root, f"{root}/a"):
        ours = {e["name"]: (e["type"], e["size"], e.get("ETag")) for e in fs.ls(folder, detail=True)}
        theirs = {e["name"]: (e["type"], e["size"], e.get("ETag")) for e in s3_server.fs().ls(folder, detail=True)}
        assert ours == theirs
    with pytest.raises(FileNotFoundError):
        fs.ls(f"{bucket}/missing")


@pytest.mark.s3
def test_on_s3_a_listing_is_never_served_from_the_cache(s3_server, s3_tree):
    bucket, _ = s3_tree
    fs = s3_server.fs()
    fs.pipe(f"{bucket}/fresh/a.jpg", b"x")
    fs.ls(f"{bucket}/fresh")  # cached
    s3_server.fs().pipe(f"{bucket}/fresh/b.jpg", b"x")  # written by another client: fs's cache is stale
    assert [f.path for f in iter_files(fs, f"{bucket}/fresh", (".jpg",))] == ["a.jpg", "b.jpg"]


@pytest.mark.s3
def test_on_s3_a_file_root_a_missing_root_and_detection(s3_server, s3_tree):
    bucket, root = s3_tree
    fs = s3_server.fs()
    [f] = iter_files(fs, f"{root}/a.jpg", (".jpg",))
    assert (f.path, f.size) == ("a.jpg", 1)
    assert list(iter_files(fs, f"{root}/notes.txt", (".jpg",))) == []
    assert list(iter_files(fs, f"{bucket}/missing", (".jpg",))) == [] == find_based(fs, f"{bucket}/missing", (".jpg",))
    fs.pipe({f"{bucket}/tars/s/{n}.tar": b"x" for n in range(3)} | {f"{bucket}/pq/t/c.parquet": b"x"})
    detected = [detect_layout(fs, p) for p in (root, f"{bucket}/tars", f"{bucket}/pq")]
    assert detected == ["files", "webdataset", "parquet"]


@pytest.mark.s3
@pytest.mark.slow
def test_the_listing_bench_times_every_variant_over_the_same_paths(tmp_path):
    from pipeline.bench.listing import measure

    report = measure(tmp_path, objects=120, prefixes=12, rounds=2, concurrencies=(4,))
    variants = report["variants"]
    assert list(variants) == ["s3fs_find", "s3fs_walk_1", "s3fs_walk_16", "obstore_walk_1", "obstore_walk_4"]
    assert all(v["seconds"]["min"] <= v["seconds"]["median"] <= v["seconds"]["max"] for v in variants.values())
    assert variants["s3fs_walk_1"]["speedup_vs_sequential"] == variants["obstore_walk_1"]["speedup_vs_sequential"]
    assert variants["s3fs_find"]["speedup_vs_s3fs_find"] == 1.0
    assert variants["obstore_walk_4"]["cached_entries_after"] == 0 < variants["s3fs_find"]["cached_entries_after"]
    assert json.loads((tmp_path / "listing.json").read_text()) == report
