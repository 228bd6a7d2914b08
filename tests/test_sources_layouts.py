"""The webdataset and parquet input layouts: planning, what a read yields, streaming, and how failures surface."""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.errors import InputError
from pipeline.sources import Shard, shard_id_for
from pipeline.sources import parquet as parquet_layout
from pipeline.sources import webdataset as tar_layout

LOCAL = fsspec.filesystem("file")


def encoded(fmt: str, value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict], compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f, wds.TarWriter(f, compress=compress) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def raw_tar(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """A tar written member by member; None content makes a directory."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


class Recorded(io.RawIOBase):
    """A storage file that counts the bytes read from it and, given ``error``, raises it past ``fail_after`` bytes."""

    def __init__(self, f, fail_after: int | None = None, error: Exception | None = None):
        self.f, self.fail_after, self.error, self.bytes_read = f, fail_after, error, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def readinto(self, buf) -> int:
        if self.fail_after is not None and self.bytes_read + len(buf) > self.fail_after:
            raise self.error
        n = self.f.readinto(buf)
        self.bytes_read += n
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


class Storage:
    """The local filesystem with its opened files wrapped in ``Recorded``: the one fake, to count or break reads."""

    def __init__(self, **recorded):
        self.recorded, self.files = recorded, []

    def open(self, path: str, mode: str = "rb") -> Recorded:
        self.files.append(Recorded(LOCAL.open(path, mode), **self.recorded))
        return self.files[-1]

    def unstrip_protocol(self, path: str) -> str:
        return LOCAL.unstrip_protocol(path)


# --- webdataset ---------------------------------------------------------------------------------------------------

JPG, PNG = encoded("JPEG", 40), encoded("PNG", 90)
LABEL_A, LABEL_B = encoded("PNG", 1), encoded("PNG", 2)
WRITTEN = [
    {"__key__": "sample_000", "jpg": JPG, "seg.png": LABEL_A},
    {"__key__": "sample_001", "png": PNG, "seg.png": LABEL_B},
    {"__key__": "sample_002", "jpg": JPG},  # no label
    {"__key__": "sample_003", "json": b"{}", "seg.png": LABEL_A},  # no image
]


def read_all(fs, root, shard, **kw) -> list:
    return list(tar_layout.read(fs, root, shard, **kw))


def test_webdataset_read_matches_what_the_writer_wrote(tmp_path):
    root = str(tmp_path / "shards")
    path = write_tar(tmp_path / "shards" / "train-000.tar", WRITTEN)
    [shard] = tar_layout.plan(LOCAL, root)
    got = read_all(LOCAL, root, shard)

    uri = LOCAL.unstrip_protocol(str(path))
    assert [(s.image_id, s.name, s.source_uri) for s in got] == [
        ("train-000/sample_000.jpg", "sample_000.jpg", f"{uri}#sample_000.jpg"),
        ("train-000/sample_001.png", "sample_001.png", f"{uri}#sample_001.png"),
        ("train-000/sample_002.jpg", "sample_002.jpg", f"{uri}#sample_002.jpg"),
        ("train-000/sample_003", "sample_003", f"{uri}#sample_003"),
    ]
    assert [(s.image, s.label, s.error) for s in got[:3]] == [
        (JPG, LABEL_A, None),
        (PNG, LABEL_B, None),
        (JPG, None, None),
    ]
    assert got[3].image is None and got[3].error == "tar entry sample_003 has no image member (found: json, seg.png)"
    assert got[0].label_uri == f"{uri}#sample_000.seg.png" and got[2].label_uri is None
    # webdataset itself reads the same keys and bytes; __key__ named the sample and is not a member.
    theirs = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in theirs] == [f"sample_{i:03d}" for i in range(4)]
    assert [s.image for s in got[:3]] == [theirs[0]["jpg"], theirs[1]["png"], theirs[2]["jpg"]]
    with tarfile.open(path) as tar:
        assert not any("__key__" in name for name in tar.getnames())


def test_webdataset_label_suffix_is_an_exact_extension(tmp_path):
    write_tar(tmp_path / "t.tar", [{"__key__": "k", "jpg": JPG, "seg.png": LABEL_A, "labelids.png": LABEL_B}])
    [shard] = tar_layout.plan(LOCAL, str(tmp_path))
    assert read_all(LOCAL, str(tmp_path), shard, label_suffix="labelIds.png")[0].label == LABEL_B
    assert read_all(LOCAL, str(tmp_path), shard, label_suffix="png")[0].label is None


def test_webdataset_grouping_follows_webdataset_rules(tmp_path):
    path = raw_tar(
        tmp_path / "t.tar",
        [
            ("dir", None),  # not a regular file
            ("__meta__", b"m"),  # webdataset metadata
            ("__index__/a.jpg", JPG),  # under a __meta__ folder
            (".hidden.jpg", JPG),  # no key: nothing before the first dot
            ("a.jpg", JPG),
            ("a.seg.png", LABEL_A),
            ("_under.png", PNG),
            ("dir/x.JPG", JPG),  # extensions are lowercased; the name is kept
            ("y.0001.jpg", JPG),  # the extension is everything after the first dot
            ("a.png", PNG),  # a key seen again later is another sample, as in webdataset
            ("noext", b"n"),
            ("__key__", b"k"),
        ],
    )
    theirs = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in theirs] == ["a", "_under", "dir/x", "y", "a"]

    got = read_all(LOCAL, str(tmp_path), tar_layout.plan(LOCAL, str(tmp_path))[0])
    assert [s.image_id for s in got] == ["t/a.jpg", "t/_under.png", "t/dir/x.JPG", "t/y", "t/a.png"]
    assert [s.image for s in got] == [theirs[0]["jpg"], theirs[1]["png"], theirs[2]["jpg"], None, theirs[4]["png"]]
    assert got[0].label == LABEL_A
    assert got[3].error == "tar entry y has no image member (found: 0001.jpg)"


def test_webdataset_first_image_wins_and_a_repeated_member_is_an_error(tmp_path):
    raw_tar(tmp_path / "t.tar", [("k.png", PNG), ("k.jpg", JPG), ("d.jpg", JPG), ("d.jpg", JPG), ("e.jpg", JPG)])
    got = read_all(LOCAL, str(tmp_path), tar_layout.plan(LOCAL, str(tmp_path))[0])
    assert [(s.image_id, s.image) for s in got] == [("t/k.png", PNG), ("t/d", None), ("t/e.jpg", JPG)]
    assert got[1].error == "tar entry d has member jpg twice"


def test_webdataset_plan_one_shard_per_tar_with_stable_ids(tmp_path):
    root = tmp_path / "in"
    a = write_tar(root / "a" / "train-000.tar", WRITTEN[:2])
    write_tar(root / "b" / "train-001.tar.gz", WRITTEN[2:], compress=True)
    write_tar(root / "b" / "train-002.tgz", WRITTEN[:1], compress=True)
    write_tar(root / ".cache" / "old.tar", WRITTEN)
    write_tar(root / "a" / ".partial.tar", WRITTEN)
    (root / "notes.txt").write_text("not a shard")

    shards = tar_layout.plan(LOCAL, str(root))
    assert [(s.member, s.images, s.items) for s in shards] == [
        ("a/train-000.tar", None, ()),
        ("b/train-001.tar.gz", None, ()),
        ("b/train-002.tgz", None, ()),
    ]
    assert shards[0].shard_id == shard_id_for(0, "a/train-000.tar", a.stat().st_size)
    assert tar_layout.plan(LOCAL, str(root)) == shards
    assert [s.image_id for s in read_all(LOCAL, str(root), shards[1])] == [
        "b/train-001/sample_002.jpg",
        "b/train-001/sample_003",
    ]
    assert [s.image_id for s in read_all(LOCAL, str(root), shards[2])] == ["b/train-002/sample_000.jpg"]

    write_tar(a, WRITTEN[:3])  # rewritten with another size
    again = tar_layout.plan(LOCAL, str(root))
    assert again[0].shard_id != shards[0].shard_id and again[1:] == shards[1:]


def test_webdataset_root_may_be_one_tar(tmp_path):
    path = str(write_tar(tmp_path / "train-000.tar", WRITTEN[:1]))
    [shard] = tar_layout.plan(LOCAL, path)
    assert shard.member == "train-000.tar"
    assert [s.image_id for s in read_all(LOCAL, path, shard)] == ["train-000/sample_000.jpg"]


def test_webdataset_read_streams_the_tar(tmp_path):
    """Only a prefix of the file is read before the first sample comes out."""
    size, count = 256 * 1024, 8
    rng = np.random.default_rng(0)
    path = write_tar(tmp_path / "big.tar", [{"__key__": f"k{i}", "jpg": rng.bytes(size)} for i in range(count)])
    storage = Storage()
    [shard] = tar_layout.plan(LOCAL, str(tmp_path))
    samples = tar_layout.read(storage, str(tmp_path), shard)

    first = next(samples)
    assert first.image_id == "big/k0.jpg" and len(first.image) == size
    assert storage.files[0].bytes_read < 2.1 * size < path.stat().st_size / 3
    assert len(list(samples)) == count - 1
    assert storage.files[0].bytes_read >= count * size


def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Each member's (header offset, data offset)."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


@pytest.mark.parametrize(
    ("cut", "before"),
    [
        pytest.param(lambda o: o["sample_002.jpg"][1] + 100, 2, id="in-data"),
        # At or in a header, sample_001 might have had more members: it is not yielded.
        pytest.param(lambda o: o["sample_002.jpg"][0], 1, id="at-header"),
        pytest.param(lambda o: o["sample_002.jpg"][0] + 100, 1, id="in-header"),
        pytest.param(lambda o: 0, 0, id="empty"),
    ],
)
def test_webdataset_truncated_tar_yields_what_was_read_then_one_error(tmp_path, cut, before):
    full = write_tar(tmp_path / "full.tar", [dict(s, jpg=JPG) for s in WRITTEN])
    data = full.read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.tar").write_bytes(data[: cut(member_offsets(full))])

    [shard] = tar_layout.plan(LOCAL, str(tmp_path / "in"))
    got = read_all(LOCAL, str(tmp_path / "in"), shard)
    assert [s.image_id for s in got] == [f"cut/sample_{i:03d}.jpg" for i in range(before)] + ["cut/<unreadable>"]
    assert got[-1].image is None and got[-1].source_uri == LOCAL.unstrip_protocol(str(tmp_path / "in" / "cut.tar"))
    assert got[-1].error.startswith(f"tar is corrupt or truncated after {before} samples: ReadError")


def test_webdataset_garbage_is_reported_as_corrupt(tmp_path):
    (tmp_path / "junk.tar").write_bytes(os.urandom(4096))
    [sample] = read_all(LOCAL, str(tmp_path), tar_layout.plan(LOCAL, str(tmp_path))[0])
    assert sample.image_id == "junk/<unreadable>" and "after 0 samples" in sample.error


class PayloadError(Exception):
    """Stands for an HTTP client's error (aiohttp, botocore): not an OSError."""


@pytest.mark.parametrize(
    "error",
    [ConnectionResetError("reset by peer"), OSError("EIO"), asyncio.IncompleteReadError(b"", 100), PayloadError("x")],
    ids=type,
)
@pytest.mark.parametrize("name", ["t.tar", "t.tar.gz"])
@pytest.mark.parametrize("fail_after", [0, 40_000])
def test_webdataset_storage_errors_propagate(tmp_path, error, name, fail_after):
    """A failing read is the storage's fault, even where tarfile would call the same exception a bad tar."""
    rng = np.random.default_rng(1)
    samples = [{"__key__": f"k{i}", "jpg": rng.bytes(20_000)} for i in range(4)]
    write_tar(tmp_path / name, samples, compress=name.endswith("gz"))
    [shard] = tar_layout.plan(LOCAL, str(tmp_path))
    got = []
    with pytest.raises(type(error)):
        for sample in tar_layout.read(Storage(fail_after=fail_after, error=error), str(tmp_path), shard):
            got.append(sample)
    assert all(s.error is None for s in got) and len(got) < 4


# --- parquet ------------------------------------------------------------------------------------------------------


def write_parquet(path: Path, table: pa.Table, row_group_size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def images(n: int) -> list[bytes]:
    return [encoded("PNG", i) for i in range(n)]


@pytest.mark.parametrize(
    ("counts", "shard_size", "ranges"),
    [
        ([3, 3, 3, 1], 4, [(0, 2, 6), (2, 4, 4)]),
        ([3, 3, 3, 1], 3, [(0, 1, 3), (1, 2, 3), (2, 3, 3), (3, 4, 1)]),
        ([10], 4, [(0, 1, 10)]),
        ([3, 0, 3], 3, [(0, 1, 3), (1, 3, 3)]),
        ([3, 0], 3, [(0, 1, 3)]),
        ([], 4, []),
    ],
)
def test_cut_row_groups(counts, shard_size, ranges):
    assert parquet_layout.cut_row_groups(counts, shard_size) == ranges


def test_parquet_plan_cuts_files_into_row_group_shards(tmp_path):
    root = tmp_path / "table"
    table = pa.table({"image": images(10)})
    a = write_parquet(root / "a.parquet", table, 3)  # row groups of 3, 3, 3, 1 rows
    b = write_parquet(root / "sub" / "b.parquet", table.slice(0, 2), 3)
    write_parquet(root / "empty.parquet", table.slice(0, 0), 3)
    write_parquet(root / "_temporary" / "c.parquet", table, 3)
    write_parquet(root / ".d.parquet", table, 3)
    (root / "_SUCCESS").write_bytes(b"")

    shards = parquet_layout.plan(LOCAL, str(root), shard_size=4)
    assert [(s.member, s.row_groups, s.images) for s in shards] == [
        ("a.parquet", (0, 2), 6),
        ("a.parquet", (2, 4), 4),
        ("sub/b.parquet", (0, 1), 2),
    ]
    sizes = {"a.parquet": a.stat().st_size, "sub/b.parquet": b.stat().st_size}
    assert [s.shard_id for s in shards] == [
        shard_id_for(n, s.member, sizes[s.member], *s.row_groups) for n, s in enumerate(shards)
    ]
    assert parquet_layout.plan(LOCAL, str(root), shard_size=4) == shards
    assert [(s.row_groups, s.images) for s in parquet_layout.plan(LOCAL, str(root / "a.parquet"), 100)] == [
        ((0, 4), 10)
    ]


def test_parquet_read_with_id_and_label_columns(tmp_path):
    pictures, labels = images(5), images(5)
    pictures[2], labels[3] = None, None
    table = pa.table(
        {"id": [f"img_{i}.png" for i in range(5)], "image": pictures, "label": labels, "other": list(range(5))}
    )
    path = write_parquet(tmp_path / "t.parquet", table, 2)
    kw = {"image_column": "image", "label_column": "label", "id_column": "id"}
    shards = parquet_layout.plan(LOCAL, str(tmp_path), 2, **kw)
    got = [s for shard in shards for s in parquet_layout.read(LOCAL, str(tmp_path), shard, **kw)]

    uri = LOCAL.unstrip_protocol(str(path))
    assert [(s.image_id, s.name, s.source_uri) for s in got] == [
        (f"img_{i}.png", f"img_{i}.png", f"{uri}#row={i}") for i in range(5)
    ]
    assert [s.image for s in got] == pictures and [s.label for s in got] == labels
    assert [s.error for s in got] == [None, None, "null image", None, None]


def test_parquet_read_default_ids_count_rows_in_the_file(tmp_path):
    write_parquet(tmp_path / "sub" / "t.parquet", pa.table({"image": images(10)}), 3)
    shards = parquet_layout.plan(LOCAL, str(tmp_path), 4)
    second = list(parquet_layout.read(LOCAL, str(tmp_path), shards[1]))
    assert [(s.image_id, s.name) for s in second] == [(f"sub/t/{i:08d}", f"sub/t/{i:08d}") for i in range(6, 10)]
    assert second[0].source_uri.endswith("t.parquet#row=6") and second[0].label is None


def test_parquet_hugging_face_image_structs(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pictures, masks = images(3), images(3)
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": pictures[0], "path": "ADE_0.jpg"}, {"bytes": pictures[1], "path": None}, None],
                image_type,
            ),
            "annotation": pa.array([{"bytes": m, "path": f"ADE_{i}.png"} for i, m in enumerate(masks)], image_type),
        }
    )
    write_parquet(tmp_path / "train.parquet", table, 10)
    path = str(tmp_path / "train.parquet")
    [shard] = parquet_layout.plan(LOCAL, path, 10, label_column="annotation")
    got = list(parquet_layout.read(LOCAL, path, shard, label_column="annotation"))
    assert [(s.image_id, s.name) for s in got] == [
        ("train/00000000", "ADE_0.jpg"),
        ("train/00000001", "train/00000001"),
        ("train/00000002", "train/00000002"),
    ]
    assert [s.image for s in got] == pictures[:2] + [None] and [s.label for s in got] == masks
    assert got[2].error == "null image"


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"image_column": "img"}, "input.image_column 'img' is not a column (columns: image, id, caption)"),
        ({"label_column": "mask"}, "input.label_column 'mask' is not a column (columns: image, id, caption)"),
        ({"id_column": "key"}, "input.id_column 'key' is not a column (columns: image, id, caption)"),
        ({"image_column": "caption"}, "input.image_column 'caption' is string, expected binary or struct<bytes"),
        ({"label_column": "id"}, "input.label_column 'id' is int64, expected binary"),
    ],
)
def test_parquet_schema_errors_name_the_file_and_column(tmp_path, columns, message):
    one = images(1)
    fits = {"image": one, "img": one, "mask": one, "key": [1], "caption": one, "id": one}
    write_parquet(tmp_path / "a.parquet", pa.table(fits), 1)
    bad = write_parquet(tmp_path / "b.parquet", pa.table({"image": one, "id": [1], "caption": ["x"]}), 1)
    with pytest.raises(InputError) as err:
        parquet_layout.plan(LOCAL, str(tmp_path), 10, **columns)
    assert str(err.value).startswith(f"{LOCAL.unstrip_protocol(str(bad))}: {message}")


def test_parquet_not_a_parquet_file(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"x\.parquet: not a readable Parquet file"):
        parquet_layout.plan(LOCAL, str(tmp_path), 10)


def test_parquet_read_holds_one_row_group_at_a_time(tmp_path):
    """Reading the middle shard of a file reads its row groups one by one, never the others."""
    rng = np.random.default_rng(2)
    path = write_parquet(tmp_path / "t.parquet", pa.table({"image": [rng.bytes(100_000) for _ in range(12)]}), 3)
    group_bytes = 3 * 100_000
    shard = Shard("s", member="t.parquet", row_groups=(1, 3), images=6)
    storage = Storage()
    samples = parquet_layout.read(storage, str(tmp_path), shard)

    assert next(samples).image_id == "t/00000003"
    footer = 64 * 1024  # pyarrow's first read of the file's tail
    assert storage.files[0].bytes_read < footer + 1.2 * group_bytes
    assert [s.image_id for s in samples] == [f"t/{i:08d}" for i in range(4, 9)]
    assert storage.files[0].bytes_read < footer + 2.2 * group_bytes < path.stat().st_size
