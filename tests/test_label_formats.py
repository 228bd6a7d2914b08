"""Label formats to index masks, checked against masks drawn by hand (``.`` = 0, a digit = that class, x = 255)."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import pipeline.images  # noqa: F401  (turns Pillow's own pixel limit off, as in the pipeline)
from pipeline.config import LabelsConfig
from pipeline.errors import ConfigError
from pipeline.labels import (
    CITYSCAPES_CLASSES,
    LabelError,
    apply_mapping,
    cityscapes_label_path,
    label_format,
    reduce_zero_label,
)
from pipeline.palette import mask_to_png

# pycocotools' compiled decode trips numpy 2's copy-keyword deprecation; not ours to fix.


def grid(art: str) -> np.ndarray:
    """A uint8 mask from rows of characters: ``.`` is 0, a digit is its value, ``x`` is 255."""
    rows = [line.strip() for line in art.strip().splitlines()]
    return np.array([[0 if c == "." else 255 if c == "x" else int(c) for c in row] for row in rows], np.uint8)


def png_l(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, "PNG")
    return buf.getvalue()


def fmt(dataset_json: bytes | None = None, **cfg):
    return label_format(LabelsConfig(**cfg), dataset_json)


# --- index PNG, reduce_zero_label, binary -------------------------------------------------------------------------


def test_apply_mapping_table():
    mask = np.array([[1, 2, 3], [3, 255, 1]], np.uint8)
    out = apply_mapping(mask, {1: 0, 2: 5, 3: 5})
    assert out.dtype == np.uint8
    assert np.array_equal(out, [[0, 5, 5], [5, 255, 0]])


def test_apply_mapping_unmapped_values_named():
    mask = np.array([[0, 7, 9, 7]], np.uint8)
    with pytest.raises(LabelError, match=r"label value\(s\) \[7, 9\] not in labels.mapping"):
        apply_mapping(mask, {0: 0})


def test_apply_mapping_255_passes_through_unless_mapped():
    mask = np.array([[0, 255]], np.uint8)
    assert np.array_equal(apply_mapping(mask, {0: 1}), [[1, 255]])
    assert np.array_equal(apply_mapping(mask, {0: 1, 255: 2}), [[1, 2]])


def test_reduce_zero_label_like_mmsegmentation():
    mask = np.array([[0, 1, 2, 255, 254]], np.uint8)
    assert np.array_equal(reduce_zero_label(mask), [[255, 0, 1, 255, 253]])
    assert np.array_equal(mask, [[0, 1, 2, 255, 254]])  # the input is not modified


def test_index_png_format_mapping_then_reduce_zero_label():
    f = fmt(format="index_png", mapping={10: 0, 20: 1, 30: 2}, reduce_zero_label=True)
    assert f.per_image and f.path_for("a/b.jpg") == "a/b.png" and f.class_names() is None
    label = mask_to_png(np.array([[10, 20], [30, 255]], np.uint8))
    assert np.array_equal(f.to_mask(label, 2, 2), [[255, 0], [1, 255]])


def test_index_png_format_plain_and_size_mismatch():
    f = fmt()
    mask = np.array([[0, 1, 2], [255, 4, 0]], np.uint8)
    assert np.array_equal(f.to_mask(png_l(mask), 2, 3), mask)
    with pytest.raises(LabelError, match="label is 3x2 but the image is 2x3"):
        f.to_mask(png_l(mask), 3, 2)


def test_binary_default_mapping():
    f = fmt(format="binary")
    assert f.path_for("d/x.jpeg") == "d/x.png"
    raw = np.array([[0, 255, 255], [0, 0, 255]], np.uint8)
    assert np.array_equal(f.to_mask(png_l(raw), 2, 3), [[0, 1, 1], [0, 0, 1]])


def test_binary_mode_1_png():
    buf = io.BytesIO()
    Image.fromarray(np.array([[True, False], [False, True]])).save(buf, "PNG")
    assert np.array_equal(fmt(format="binary").to_mask(buf.getvalue(), 2, 2), [[1, 0], [0, 1]])


def test_binary_custom_mapping():
    raw = np.array([[0, 255]], np.uint8)
    assert np.array_equal(fmt(format="binary", mapping={0: 1, 255: 0}).to_mask(png_l(raw), 1, 2), [[1, 0]])


def test_binary_other_values_rejected():
    raw = np.array([[0, 128, 255]], np.uint8)
    with pytest.raises(LabelError, match=r"only 0 and 255.*\[128\]"):
        fmt(format="binary").to_mask(png_l(raw), 1, 3)
    rgb = io.BytesIO()
    Image.new("RGB", (3, 1)).save(rgb, "PNG")
    with pytest.raises(LabelError, match="mode RGB"):
        fmt(format="binary").to_mask(rgb.getvalue(), 1, 3)


def png_header(width: int, height: int) -> bytes:
    """An L PNG that claims width x height but stops at the start of its pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))[:6])


@pytest.mark.parametrize("format", ["index_png", "binary", "cityscapes"])
def test_label_size_is_checked_from_the_header_before_decoding(format):
    f = fmt(format=format)
    # a huge label is refused from its header (its pixel data is not even there: decoding would fail otherwise)
    with pytest.raises(LabelError, match="label is 20000x20000 but the image is 3x2"):
        f.to_mask(png_header(20000, 20000), 2, 3)
    with pytest.raises(LabelError, match="cannot decode label"):
        f.to_mask(png_header(3, 2), 2, 3)
    with pytest.raises(LabelError, match="cannot decode label"):
        f.to_mask(b"not a png", 2, 3)


# --- Cityscapes -------------------------------------------------------------------------------------------------


def test_cityscapes_label_ids_to_train_ids():
    label_ids = np.array(
        [
            [7, 8, 26, 0],  # road, sidewalk, car, unlabeled
            [33, 24, 1, 11],  # bicycle, person, ego vehicle, building
            [9, 29, 31, 23],  # parking, caravan, train, sky
        ],
        np.uint8,
    )
    expected = np.array([[0, 1, 13, 255], [18, 11, 255, 2], [255, 255, 16, 10]], np.uint8)
    f = fmt(format="cityscapes")
    assert np.array_equal(f.to_mask(png_l(label_ids), 3, 4), expected)


@pytest.mark.parametrize("value", [34, 40, 255])
def test_cityscapes_values_outside_label_ids_rejected(value):
    with pytest.raises(LabelError, match=str(value)):
        fmt(format="cityscapes").to_mask(png_l(np.array([[7, value]], np.uint8)), 1, 2)


@pytest.mark.parametrize(
    "image,label",
    [
        (
            "val/frankfurt/frankfurt_000000_000294_leftImg8bit.png",
            "val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png",
        ),
        ("a/b_leftImg8bit.jpg", "a/b_gtFine_labelIds.png"),
        ("a/photo.jpg", "a/photo_gtFine_labelIds.png"),
    ],
)
def test_cityscapes_label_path(image, label):
    assert cityscapes_label_path(image) == label
    assert fmt(format="cityscapes").path_for(image) == label


def test_cityscapes_classes():
    assert len(CITYSCAPES_CLASSES) == 19
    assert CITYSCAPES_CLASSES[:3] == ["road", "sidewalk", "building"]
    assert CITYSCAPES_CLASSES[13] == "car" and CITYSCAPES_CLASSES[-1] == "bicycle"
    assert fmt(format="cityscapes").class_names() == CITYSCAPES_CLASSES


# --- COCO -------------------------------------------------------------------------------------------------------

H, W = 6, 8
CATS = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 5, "name": "car"}]


def rle(art: str) -> dict:
    """Compressed RLE (counts as a string, as in COCO files) of a hand-drawn mask."""
    encoded = mask_utils.encode(np.asfortranarray(grid(art)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


def ann(ann_id: int, category: int, segmentation, iscrowd: int = 0, image_id: int = 1) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "segmentation": segmentation,
        "iscrowd": iscrowd,
    }


def coco_json(*annotations: dict, images: list[dict] | None = None) -> bytes:
    images = images or [{"id": 1, "file_name": "val/a.jpg", "height": H, "width": W}]
    return json.dumps({"images": images, "annotations": list(annotations), "categories": CATS}).encode()


def coco_mask(data: bytes, name: str = "val/a.jpg", **cfg) -> np.ndarray:
    f = fmt(data, format="coco", **cfg)
    return f.to_mask(f.lookup(name), H, W)


def test_coco_polygon_edge_convention():
    # pycocotools: pixel (x, y) is inside when its centre is; the right and bottom edges are left out.
    on_grid = coco_mask(coco_json(ann(1, 1, [[1, 1, 5, 1, 5, 4, 1, 4]])))
    assert np.array_equal(
        on_grid,
        grid("""
            ........
            .1111...
            .1111...
            .1111...
            ........
            ........
        """),
    )
    half = coco_mask(coco_json(ann(1, 3, [[1.5, 1.5, 5.5, 1.5, 5.5, 4.5, 1.5, 4.5]])))
    assert np.array_equal(
        half,
        grid("""
            ........
            ........
            ..2222..
            ..2222..
            ..2222..
            ........
        """),
    )


def test_coco_overlap_of_different_classes_is_ignore():
    cat = ann(1, 1, [[0, 0, 4, 0, 4, 3, 0, 3]])
    dog = ann(
        2,
        3,
        rle("""
            ........
            ..1111..
            ..1111..
            ..1111..
            ..1111..
            ........
        """),
    )
    expected = grid("""
        1111....
        11xx22..
        11xx22..
        ..2222..
        ..2222..
        ........
    """)
    assert np.array_equal(coco_mask(coco_json(cat, dog)), expected)
    assert np.array_equal(coco_mask(coco_json(dog, cat)), expected)


def test_coco_overlap_of_same_class_keeps_it():
    poly = ann(1, 1, [[0, 0, 4, 0, 4, 3, 0, 3]])
    # Uncompressed RLE: column-major run lengths starting with zeros; column 1 rows 3..5, column 2 rows 3..5.
    uncompressed = ann(2, 1, {"size": [H, W], "counts": [9, 3, 3, 3, 30]})
    assert np.array_equal(
        coco_mask(coco_json(poly, uncompressed)),
        grid("""
            1111....
            1111....
            1111....
            .11.....
            .11.....
            .11.....
        """),
    )


def test_coco_crowd_is_ignore():
    cat = ann(1, 1, [[0, 0, 4, 0, 4, 3, 0, 3]])
    crowd = ann(2, 3, {"size": [H, W], "counts": [9, 3, 3, 3, 30]}, iscrowd=1)
    assert np.array_equal(
        coco_mask(coco_json(crowd, cat)),
        grid("""
            1111....
            1111....
            1111....
            .xx.....
            .xx.....
            .xx.....
        """),
    )


def test_coco_default_mapping_sorted_ids_from_one():
    data = coco_json(ann(1, 5, [[0, 0, 2, 0, 2, 2, 0, 2]]), ann(2, 3, [[6, 4, 8, 4, 8, 6, 6, 6]]))
    assert np.array_equal(
        coco_mask(data),
        grid("""
            33......
            33......
            ........
            ........
            ......22
            ......22
        """),
    )
    assert fmt(data, format="coco").class_names() == ["background", "cat", "dog", "car"]


def test_coco_mapping_applied_and_unmapped_category_dropped():
    data = coco_json(
        ann(1, 1, [[0, 0, 2, 0, 2, 2, 0, 2]]),
        ann(2, 3, [[6, 4, 8, 4, 8, 6, 6, 6]]),
        ann(3, 5, [[1, 1, 7, 1, 7, 5, 1, 5]]),  # car, unmapped: under the others and dropped
        ann(4, 5, {"size": [H, W], "counts": [9, 3, 3, 3, 30]}, iscrowd=1),  # unmapped crowd: dropped too
    )
    assert np.array_equal(
        coco_mask(data, mapping={1: 2, 3: 1}),
        grid("""
            22......
            22......
            ........
            ........
            ......11
            ......11
        """),
    )
    assert fmt(data, format="coco", mapping={1: 2, 3: 1}).class_names() == ["background", "dog", "cat"]
    assert fmt(data, format="coco", mapping={1: 1, 3: 1, 5: 255}).class_names() == ["background", "cat/dog"]


def test_coco_mapping_of_unknown_category_rejected():
    with pytest.raises(ConfigError, match=r"\[7\]"):
        fmt(coco_json(), format="coco", mapping={1: 1, 7: 2})


def test_coco_image_without_annotations_is_background():
    data = coco_json(images=[{"id": 1, "file_name": "val/a.jpg", "height": H, "width": W}])
    assert np.array_equal(coco_mask(data), np.zeros((H, W), np.uint8))


def test_coco_lookup_by_name_and_basename():
    images = [
        {"id": 1, "file_name": "a.jpg", "height": H, "width": W},
        {"id": 2, "file_name": "train/c.jpg", "height": H, "width": W},
        {"id": 3, "file_name": "val/c.jpg", "height": 4, "width": 4},
    ]
    f = fmt(coco_json(images=images), format="coco")
    assert not f.per_image and f.path_for("a.jpg") is None
    assert f.lookup("a.jpg").file_name == "a.jpg"
    assert f.lookup("val/a.jpg").file_name == "a.jpg"  # unique basename
    assert f.lookup("val/c.jpg").height == 4  # exact match wins over the shared basename
    assert f.lookup("missing.jpg") is None
    with pytest.raises(LabelError, match="matches 2 COCO images"):
        f.lookup("test/c.jpg")


def test_coco_size_mismatch():
    f = fmt(coco_json(), format="coco")
    with pytest.raises(LabelError, match="label is 8x6 but the image is 6x8"):
        f.to_mask(f.lookup("val/a.jpg"), W, H)


def test_coco_rle_of_another_size_rejected():
    bad = ann(1, 1, {"size": [4, 4], "counts": [16]})
    with pytest.raises(LabelError, match="RLE size"):
        coco_mask(coco_json(bad))


def test_coco_needs_the_json():
    with pytest.raises(ConfigError, match="COCO"):
        fmt(format="coco")
    with pytest.raises(ConfigError, match="not a COCO instances JSON"):
        fmt(b"{}", format="coco")


# --- Labelme ----------------------------------------------------------------------------------------------------

CLASSES = ["__ignore__", "_background_", "cat", "dog"]


def labelme(*shapes: dict, height: int = 8, width: int = 10) -> bytes:
    doc = {
        "version": "5.4.1",
        "flags": {},
        "shapes": list(shapes),
        "imagePath": "x.jpg",
        "imageData": None,
        "imageHeight": height,
        "imageWidth": width,
    }
    return json.dumps(doc).encode()


def shape(label: str, shape_type: str | None, points: list) -> dict:
    return {
        "label": label,
        "points": points,
        "group_id": None,
        "description": "",
        "shape_type": shape_type,
        "flags": {},
    }


def lm_mask(data: bytes, height: int = 8, width: int = 10, classes: list[str] = CLASSES) -> np.ndarray:
    return fmt(format="labelme", classes=classes).to_mask(data, height, width)


def test_labelme_polygon_includes_its_edges():
    poly = shape("cat", "polygon", [[1, 1], [5, 1], [5, 4], [1, 4]])
    assert np.array_equal(
        lm_mask(labelme(poly)),
        grid("""
            ..........
            .11111....
            .11111....
            .11111....
            .11111....
            ..........
            ..........
            ..........
        """),
    )


@pytest.mark.parametrize("points", [[[6, 2], [8, 5]], [[8, 5], [6, 2]]])
def test_labelme_rectangle_includes_both_corners(points):
    assert np.array_equal(
        lm_mask(labelme(shape("dog", "rectangle", points))),
        grid("""
            ..........
            ..........
            ......222.
            ......222.
            ......222.
            ......222.
            ..........
            ..........
        """),
    )


def test_labelme_later_shapes_overwrite_and_ignore():
    poly = shape("cat", None, [[1, 1], [5, 1], [5, 4], [1, 4]])  # shape_type null is a polygon
    rect = shape("dog", "rectangle", [[4, 3], [7, 6]])
    ignore = shape("__ignore__", "rectangle", [[0, 7], [1, 7]])
    assert np.array_equal(
        lm_mask(labelme(poly, rect, ignore)),
        grid("""
            ..........
            .11111....
            .11111....
            .1112222..
            .1112222..
            ....2222..
            ....2222..
            xx........
        """),
    )
    assert np.array_equal(
        lm_mask(labelme(rect, poly)),
        grid("""
            ..........
            .11111....
            .11111....
            .1111122..
            .1111122..
            ....2222..
            ....2222..
            ..........
        """),
    )


def test_labelme_circle():
    circle = shape("cat", "circle", [[4, 4], [6, 4]])  # centre, a point on the circle: radius 2
    assert np.array_equal(
        lm_mask(labelme(circle)),
        grid("""
            ..........
            ..........
            ...111....
            ..11111...
            ..11111...
            ..11111...
            ...111....
            ..........
        """),
    )


def test_labelme_point_is_a_radius_5_disc():
    point = shape("dog", "point", [[5, 5]])
    assert np.array_equal(
        lm_mask(labelme(point, height=12, width=12), 12, 12),
        grid("""
            ...22222....
            ..2222222...
            .222222222..
            22222222222.
            22222222222.
            22222222222.
            22222222222.
            22222222222.
            .222222222..
            ..2222222...
            ...22222....
            ............
        """),
    )


def test_labelme_line_is_10_pixels_wide():
    line = shape("cat", "line", [[0, 10], [11, 10]])
    expected = np.zeros((20, 12), np.uint8)
    expected[6:16, :] = 1
    assert np.array_equal(lm_mask(labelme(line, height=20, width=12), 20, 12), expected)


def test_labelme_linestrip():
    strip = shape("dog", "linestrip", [[2, 2], [2, 15], [9, 15]])
    mask = lm_mask(labelme(strip, height=20, width=12), 20, 12)
    assert mask[8, 2] == 2 and mask[15, 9] == 2
    assert mask[5, 11] == 0 and mask[0, 0] == 0
    assert set(np.unique(mask)) == {0, 2}


def test_labelme_numbering_without_ignore():
    poly = shape("dog", "polygon", [[0, 0], [1, 0], [1, 1]])
    assert lm_mask(labelme(poly), classes=["_background_", "cat", "dog"])[0, 0] == 2
    assert lm_mask(labelme(poly), classes=["cat", "dog"])[0, 0] == 1
    f = fmt(format="labelme", classes=CLASSES)
    assert f.class_names() == ["_background_", "cat", "dog"]
    assert f.per_image and f.path_for("a/b.jpg") == "a/b.json"


def test_labelme_unknown_label_rejected():
    with pytest.raises(LabelError, match="'horse'"):
        lm_mask(labelme(shape("horse", "rectangle", [[0, 0], [1, 1]])))


def test_labelme_unsupported_shape_rejected():
    with pytest.raises(LabelError, match="'mask'"):
        lm_mask(labelme(shape("cat", "mask", [[0, 0], [1, 1]])))


def test_labelme_wrong_point_count_rejected():
    with pytest.raises(LabelError, match="rectangle needs 2 points, got 3"):
        lm_mask(labelme(shape("cat", "rectangle", [[0, 0], [1, 1], [2, 2]])))
    with pytest.raises(LabelError, match="polygon needs 3 or more points"):
        lm_mask(labelme(shape("cat", "polygon", [[0, 0], [1, 1]])))


def test_labelme_size_mismatch_and_bad_json():
    with pytest.raises(LabelError, match="label is 10x8 but the image is 8x10"):
        lm_mask(labelme(), height=10, width=8)
    with pytest.raises(LabelError, match="labelme"):
        lm_mask(b"not json")
    with pytest.raises(LabelError, match="imageHeight"):
        lm_mask(b'{"shapes": []}')


def test_labelme_class_order_checked():
    with pytest.raises(ConfigError, match="_background_ must come first"):
        fmt(format="labelme", classes=["cat", "_background_"])
