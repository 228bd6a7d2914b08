"""Ground-truth labels: paths, decoding and validation against the image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.labels import LabelError, decode_label, label_path_for, validate_label
from pipeline.palette import mask_to_png


def test_size_mismatch_names_both_sizes():
    label = np.zeros((10, 20), np.uint8)  # 20 wide, 10 high
    with pytest.raises(LabelError) as ei:
        validate_label(label, height=12, width=30, num_classes=3)
    msg = str(ei.value)
    assert "20x10" in msg
    assert "30x12" in msg


def test_transposed_size_is_a_mismatch():
    with pytest.raises(LabelError):
        validate_label(np.zeros((20, 10), np.uint8), height=10, width=20, num_classes=3)


def test_unknown_class_ids_rejected():
    label = np.zeros((4, 4), np.uint8)
    label[0, 0] = 3
    label[1, 1] = 7
    with pytest.raises(LabelError) as ei:
        validate_label(label, 4, 4, num_classes=3)
    msg = str(ei.value)
    assert "[3, 7]" in msg
    assert "255" not in msg.split("(")[0]


def test_ignore_and_known_classes_pass():
    label = np.array([[0, 1, 2], [255, 255, 2]], np.uint8)
    assert validate_label(label, 2, 3, num_classes=3) is None


def test_class_254_rejected_even_with_ignore_present():
    label = np.array([[0, 255, 254]], np.uint8)
    with pytest.raises(LabelError, match="254"):
        validate_label(label, 1, 3, num_classes=21)


def test_label_is_a_value_error():
    assert issubclass(LabelError, ValueError)


@pytest.mark.parametrize(
    "image,label",
    [
        ("a/b/x.jpg", "a/b/x.png"),
        ("x.jpeg", "x.png"),
        ("x.png", "x.png"),
        ("d/x.y.tiff", "d/x.y.png"),
    ],
)
def test_label_path_for(image, label):
    assert label_path_for(image) == label


def test_decode_label_round_trip_and_errors():
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    assert np.array_equal(decode_label(mask_to_png(mask)), mask)
    with pytest.raises(LabelError, match="cannot decode label"):
        decode_label(b"not a png at all")
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, "PNG")
    with pytest.raises(LabelError, match="mode"):
        decode_label(buf.getvalue())
