"""The input layout and label format registries: lookups, config errors, auto-detection, and new entries end to end."""

from __future__ import annotations

import json
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pytest

from pipeline.config import InputConfig, LabelsConfig, load_config
from pipeline.errors import ConfigError, InputError
from pipeline.images import IMAGE_EXTENSIONS
from pipeline.labels import LabelFormat, get_label_format, list_label_formats, register_label_format
from pipeline.labels import registry as format_registry
from pipeline.labels.coco import CocoFormat
from pipeline.labels.reader import LabelReader, load_label_format
from pipeline.sources import Layout, Sample, Shard, get_layout, list_layouts, register_layout, shard_id_for
from pipeline.sources import registry as layout_registry
from pipeline.sources.files import FilesLayout
from pipeline.sources.layout import InputSource, detect_layout

LOCAL = fsspec.filesystem("file")
BUILT_IN_LAYOUTS = ["files", "manifest", "parquet", "webdataset"]
BUILT_IN_FORMATS = ["binary", "cityscapes", "coco", "index_png", "labelme"]


class TextNamedLayout(Layout):
    """Images in files named ``*.txt``: a whole layout in a few lines, registered only by the fixture."""

    listing_suffixes = (".txt",)
    listing_kind = "text-named images"
    priority = 50  # after every built-in layout
    label_files = True

    def plan(self, fs, root, cfg, shard_size):
        rels = sorted(posixpath.relpath(p, root) for p in fs.find(root) if p.endswith(".txt"))
        groups = [tuple(rels[i : i + shard_size]) for i in range(0, len(rels), shard_size)]
        return [Shard(shard_id_for(n, *items), items=items, images=len(items)) for n, items in enumerate(groups)]

    def read(self, fs, root, shard, cfg, pool):
        for rel in shard.items:
            yield Sample(rel, rel, f"file://{root}/{rel}", fs.cat_file(f"{root}/{rel}"))


class DigitFormat(LabelFormat):
    """``<stem>.digit`` holding one class as text, the whole image that class; ``mapping`` renumbers it."""

    options = frozenset({"mapping"})

    def __init__(self, mapping: dict[int, int] | None):
        self.mapping = mapping or {}

    @classmethod
    def from_config(cls, cfg, dataset_file):
        return cls(cfg.mapping)

    def path_for(self, image_rel):
        return f"{posixpath.splitext(image_rel)[0]}.digit"

    def to_mask(self, payload, height, width):
        value = int(payload)
        return np.full((height, width), self.mapping.get(value, value), np.uint8)


class TableFormat(LabelFormat):
    """One JSON for the whole dataset, image name -> class: a dataset-file format like COCO's."""

    per_image = False

    def __init__(self, table: dict[str, int]):
        self.table = table

    @classmethod
    def from_config(cls, cfg, dataset_file):
        return cls(json.loads(dataset_file))

    def path_for(self, image_rel):
        return None

    def lookup(self, name):
        return self.table.get(name)

    def to_mask(self, payload, height, width):
        return np.full((height, width), payload, np.uint8)


@pytest.fixture
def toys(monkeypatch):
    """The toy layout and formats registered for one test; the registries are restored after it."""
    for registry in (layout_registry.LAYOUTS, format_registry.LABEL_FORMATS):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    register_layout("text")(TextNamedLayout)
    register_label_format("digit")(DigitFormat)
    register_label_format("table")(TableFormat)


def job_config(**fields):
    return load_config(None, input_uri="in", output_uri="out", checkpoint_uri="model.pt", **fields)


def touch(root, *rels: str) -> str:
    for rel in rels:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return str(root)


# --- the registries -------------------------------------------------------------------------------------------------


def test_built_ins_are_listed_sorted():
    assert list_layouts() == BUILT_IN_LAYOUTS
    assert list_label_formats() == BUILT_IN_FORMATS


def test_a_registered_entry_is_listed(toys):
    assert list_layouts() == sorted([*BUILT_IN_LAYOUTS, "text"])
    assert list_label_formats() == sorted([*BUILT_IN_FORMATS, "digit", "table"])
    assert isinstance(get_layout("text"), TextNamedLayout) and get_label_format("digit") is DigitFormat


def test_the_fixture_leaves_the_registries_as_they_were():
    assert "text" not in list_layouts() and "digit" not in list_label_formats()


def test_duplicate_names_refused_and_originals_kept():
    with pytest.raises(ValueError, match="an input layout is already registered under the name 'files'"):
        register_layout("files")(TextNamedLayout)
    with pytest.raises(ValueError, match="a label format is already registered under the name 'coco'"):
        register_label_format("coco")(DigitFormat)
    assert isinstance(get_layout("files"), FilesLayout) and get_label_format("coco") is CocoFormat


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(
        ValueError, match=r"^unknown input layout 'tiff'; registered layouts: files, manifest, parquet, "
    ):
        get_layout("tiff")
    with pytest.raises(ValueError, match=r"^unknown label format 'voc'; registered formats: binary, cityscapes, "):
        get_label_format("voc")


def test_only_coco_names_one_dataset_file():
    assert [name for name in list_label_formats() if not get_label_format(name).per_image] == ["coco"]


def test_only_loose_files_find_labels_by_path_and_tars_name_images_by_member():
    assert [name for name in list_layouts() if get_layout(name).label_files] == ["files", "manifest"]
    assert get_layout("webdataset").sample_name("train-000/a/b.jpg") == "b.jpg"
    assert get_layout("files").sample_name("a/b.jpg") == "a/b.jpg"


# --- configuration --------------------------------------------------------------------------------------------------


def test_an_unknown_label_format_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError) as e:
        job_config(labels={"format": "nope"})
    assert (
        "labels.format: unknown label format 'nope'; registered formats: binary, cityscapes, coco, index_png, labelme"
        in str(e.value)
    )


def test_an_unknown_layout_is_a_config_error_naming_the_field_and_auto():
    with pytest.raises(ConfigError) as e:
        job_config(input={"layout": "tars"})
    known = "files, manifest, parquet, webdataset"
    assert f"input.layout: unknown input layout 'tars'; registered layouts: {known}; or auto, to detect it" in str(
        e.value
    )


def test_registered_names_and_auto_are_accepted(toys):
    assert InputConfig().layout == "auto" and InputConfig(layout="auto").layout == "auto"
    cfg = job_config(input={"layout": "text"}, labels={"format": "digit"})
    assert (cfg.input.layout, cfg.labels.format) == ("text", "digit")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"format": "labelme"}, "classes: the labelme format needs the class names (labelme2voc's labels.txt)"),
        ({"format": "labelme", "classes": []}, "classes: the labelme format needs the class names"),
        ({"format": "index_png", "classes": ["a"]}, "classes: only used by the labelme format, not index_png"),
        ({"format": "cityscapes", "mapping": {1: 0}}, "mapping: not used by the cityscapes format (its own table"),
        ({"format": "labelme", "classes": ["a"], "mapping": {1: 0}}, "mapping: not used by the labelme format"),
        ({"format": "coco", "reduce_zero_label": True}, "reduce_zero_label: only for the index_png format"),
    ],
)
def test_options_a_format_does_not_take_are_refused(fields, message):
    with pytest.raises(ConfigError, match="\n  labels: " + re.escape(message)):
        job_config(labels=fields)


def test_the_options_of_a_registered_format_come_from_its_class(toys):
    assert LabelsConfig(format="digit", mapping={1: 2}).mapping == {1: 2}
    with pytest.raises(ConfigError, match="classes: only used by the labelme format, not digit"):
        job_config(labels={"format": "digit", "classes": ["a"]})
    with pytest.raises(ConfigError, match="reduce_zero_label: only for the index_png format"):
        job_config(labels={"format": "table", "reduce_zero_label": True})


# --- auto-detection -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rels", "layout"),
    [
        (["a.png", "s/b.tar", "t/c.parquet"], "files"),
        (["s/b.tar", "t/c.parquet", "notes.txt"], "webdataset"),
        (["t/c.PARQUET", ".hidden.png"], "parquet"),
    ],
)
def test_a_listing_is_detected_in_priority_order(tmp_path, rels, layout):
    assert detect_layout(LOCAL, touch(tmp_path, *rels)) == layout


@pytest.mark.parametrize(
    ("rel", "layout"), [("a.tar.gz", "webdataset"), ("a.TGZ", "webdataset"), ("a.parquet", "parquet")]
)
def test_a_single_file_is_detected_by_suffix(tmp_path, rel, layout):
    touch(tmp_path, rel)
    assert detect_layout(LOCAL, str(tmp_path / rel)) == layout


def test_detection_errors_name_what_was_looked_for(tmp_path):
    png = tmp_path / "a.png"
    touch(tmp_path, "a.png")
    with pytest.raises(InputError) as e:
        detect_layout(LOCAL, str(png))
    assert str(e.value) == (
        f"input {png} is a file, but neither a tar shard (.tar.gz, .tgz, .tar), Parquet nor a manifest "
        "(.csv, .csv.gz, manifest.json)"
    )
    empty = touch(tmp_path / "empty", "notes.txt")
    with pytest.raises(InputError) as e:
        detect_layout(LOCAL, empty)
    assert str(e.value) == (
        f"input {empty} holds no images ({', '.join(IMAGE_EXTENSIONS)}), tar shards, Parquet files or manifests "
        "(.csv, .csv.gz, manifest.json)"
    )


def test_a_registered_layout_joins_detection_and_its_messages(toys, tmp_path):
    assert detect_layout(LOCAL, touch(tmp_path / "text", "notes.txt")) == "text"
    assert detect_layout(LOCAL, touch(tmp_path / "both", "notes.txt", "s/b.tar")) == "webdataset"
    with pytest.raises(
        InputError, match="holds no images .*, tar shards, Parquet files, manifests .* or text-named images$"
    ):
        detect_layout(LOCAL, touch(tmp_path / "none", "notes.md"))


# --- new entries end to end -----------------------------------------------------------------------------------------


def test_a_registered_layout_and_per_image_format_read_images_and_labels(toys, tmp_path):
    images, labels = tmp_path / "in", tmp_path / "labels"
    for n in range(3):
        touch(images, f"img{n}.txt")
        (images / f"img{n}.txt").write_bytes(f"image {n}".encode())
    touch(labels, "img0.digit", "img2.digit")
    (labels / "img0.digit").write_text("2")
    (labels / "img2.digit").write_text("1")
    cfg = job_config(labels={"format": "digit", "mapping": {2: 7}})

    source = InputSource(LOCAL, str(images), cfg.input)
    shards = source.plan(2)
    with ThreadPoolExecutor(2) as pool:
        samples = [sample for shard in shards for sample in source.read(shard, pool)]
    reader = LabelReader(cfg.labels, (LOCAL, str(labels)), source.layout)
    fetched = [reader.fetch(sample) for sample in samples]

    assert source.layout == "text" and [s.images for s in shards] == [2, 1]
    assert [(s.image_id, s.image) for s in samples] == [(f"img{n}.txt", f"image {n}".encode()) for n in range(3)]
    assert [uri and posixpath.basename(uri) for _, uri in fetched] == ["img0.digit", None, "img2.digit"]
    assert [reader.to_mask(p, 2, 3)[0, 0] for p, _ in fetched if p is not None] == [7, 1]


def test_a_registered_dataset_file_format_is_read_once_and_looked_up_by_name(toys, tmp_path):
    table = tmp_path / "labels.json"
    table.write_text(json.dumps({"a.png": 4}))
    cfg = LabelsConfig(format="table")
    reader = LabelReader(cfg, (LOCAL, str(table)), "webdataset")

    payload, uri = reader.fetch(Sample("t/a.png", "a.png", "t.tar#a.png", b""))
    assert uri == f"file://{table}#a.png" and reader.to_mask(payload, 1, 2).tolist() == [[4, 4]]
    assert reader.fetch(Sample("t/b.png", "b.png", "t.tar#b.png", b"")) == (None, None)
    assert isinstance(load_label_format(cfg, (LOCAL, str(table))), TableFormat)
