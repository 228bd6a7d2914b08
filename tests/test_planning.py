"""Listing images under a root, stable shard ids, and atomic local writes."""

from __future__ import annotations

import os
import random

import pytest

from pipeline import storage
from pipeline.sources.files import list_images, make_shards


def _paths(n: int) -> list[str]:
    return [f"dir{i % 3}/img_{i:04d}.jpg" for i in range(n)]


def test_make_shards_is_stable_under_input_order():
    paths = _paths(23)
    ref = make_shards(paths, 5)
    rng = random.Random(0)
    for _ in range(5):
        shuffled = paths[:]
        rng.shuffle(shuffled)
        again = make_shards(shuffled, 5)
        assert [s.shard_id for s in again] == [s.shard_id for s in ref]
        assert [s.items for s in again] == [s.items for s in ref]


@pytest.mark.parametrize("n,size", [(23, 5), (20, 5), (1, 1), (7, 100), (10, 1)])
def test_make_shards_partition(n, size):
    paths = _paths(n)
    shards = make_shards(paths, size)
    ids = [s.shard_id for s in shards]
    assert len(set(ids)) == len(ids)
    flat = [p for s in shards for p in s.items]
    assert sorted(flat) == sorted(paths)
    assert len(flat) == len(set(flat))
    assert len(shards) == -(-n // size)
    assert all(1 <= len(s.items) <= size for s in shards)
    assert all(len(s.items) == size for s in shards[:-1])
    assert all(isinstance(s.items, tuple) for s in shards)


def test_make_shards_empty():
    assert make_shards([], 4) == []


def test_changing_one_member_changes_only_that_shards_id():
    paths = [f"img_{i:04d}.jpg" for i in range(12)]
    before = make_shards(paths, 4)
    changed = paths[:]
    changed[5] = "img_0005b.jpg"  # sorts in the same place, so membership of other shards is unchanged
    after = make_shards(changed, 4)
    assert [s.items for s in after][0] == before[0].items
    assert after[1].items != before[1].items
    assert after[0].shard_id == before[0].shard_id
    assert after[1].shard_id != before[1].shard_id
    assert after[2].shard_id == before[2].shard_id


def test_same_members_at_another_position_get_another_id():
    a = make_shards(["a.jpg", "b.jpg"], 1)
    b = make_shards(["b.jpg"], 1)
    assert a[1].items == b[0].items
    assert a[1].shard_id != b[0].shard_id


@pytest.mark.parametrize("size", [0, -1])
def test_make_shards_rejects_bad_size(size):
    with pytest.raises(ValueError, match="shard_size"):
        make_shards(["a.jpg"], size)


def _touch(root, rel: str, data: bytes = b"x") -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def test_list_images(tmp_path):
    wanted = [
        "a.jpg",
        "B.PNG",
        "c.jpeg",
        "d.webp",
        "e.tif",
        "f.tiff",
        "g.bmp",
        "sub/h.png",
        "sub/deeper/i.jpg",
    ]
    unwanted = [
        "notes.txt",
        "a.jpg.bak",
        "sub/readme.md",
        "noext",
        ".hidden.jpg",
        ".git/j.jpg",
        "sub/.cache/k.png",
        "sub/deeper/.l.png",
    ]
    for rel in wanted + unwanted:
        _touch(tmp_path, rel)
    fs, root = storage.resolve(str(tmp_path))
    got = list_images(fs, root)
    assert got == sorted(wanted)
    assert all("\\" not in p and not p.startswith("/") for p in got)
    # the same through a file:// URI and with a trailing slash
    fs2, root2 = storage.resolve("file://" + str(tmp_path) + "/")
    assert list_images(fs2, root2) == sorted(wanted)


def test_list_images_empty_folder(tmp_path):
    fs, root = storage.resolve(str(tmp_path))
    assert list_images(fs, root) == []


def test_write_bytes_is_atomic_and_leaves_no_temporary(tmp_path):
    fs, root = storage.resolve(str(tmp_path))
    target = storage.join(root, "out", "nested", "x.png")
    storage.write_bytes(fs, target, b"first")
    storage.write_bytes(fs, target, b"second")  # overwrite
    assert (tmp_path / "out" / "nested" / "x.png").read_bytes() == b"second"
    assert os.listdir(tmp_path / "out" / "nested") == ["x.png"]
    assert storage.remove_temporaries(fs, root) == 0


def test_remove_temporaries(tmp_path):
    _touch(tmp_path, "keep.png")
    _touch(tmp_path, "sub/keep2.parquet")
    _touch(tmp_path, ".keep.png.tmp-0123abcd")
    _touch(tmp_path, "sub/.x.parquet.tmp-deadbeef")
    _touch(tmp_path, "sub/deeper/y.tmp-1")
    fs, root = storage.resolve(str(tmp_path))
    assert storage.remove_temporaries(fs, root) == 3
    left = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, files in os.walk(tmp_path) for f in files)
    assert left == ["keep.png", os.path.join("sub", "keep2.parquet")]
    assert storage.remove_temporaries(fs, root) == 0


def test_remove_temporaries_missing_root(tmp_path):
    fs, root = storage.resolve(str(tmp_path / "missing"))
    assert storage.remove_temporaries(fs, root) == 0
