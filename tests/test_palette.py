"""The VOC colormap and palette-PNG encoding of class-index masks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.palette import IGNORE_INDEX, mask_to_png, png_to_mask, voc_colormap

KNOWN = {
    0: (0, 0, 0),
    1: (128, 0, 0),
    2: (0, 128, 0),
    3: (128, 128, 0),
    4: (0, 0, 128),
    15: (192, 128, 128),
    20: (0, 64, 128),
    255: (224, 224, 192),
}


def test_voc_colormap_known_values():
    cmap = voc_colormap()
    assert cmap.shape == (256, 3)
    assert cmap.dtype == np.uint8
    for i, rgb in KNOWN.items():
        assert tuple(int(v) for v in cmap[i]) == rgb, i


def test_voc_colormap_short_has_no_ignore_override():
    cmap = voc_colormap(21)
    assert cmap.shape == (21, 3)
    assert np.array_equal(cmap, voc_colormap()[:21])


def test_mask_to_png_is_palette_png_with_voc_colours():
    mask = np.array([[0, 1, 2], [3, 15, 255]], dtype=np.uint8)
    data = mask_to_png(mask)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        assert img.mode == "P"
        assert img.size == (3, 2)
        pal = img.getpalette()
        assert np.array_equal(np.asarray(img), mask)
        rgb = np.asarray(img.convert("RGB"))
    for i, colour in KNOWN.items():
        assert tuple(pal[3 * i : 3 * i + 3]) == colour, i
    assert tuple(rgb[1, 1]) == (192, 128, 128)
    assert tuple(rgb[1, 2]) == (224, 224, 192)


def test_mask_to_png_custom_palette():
    pal = voc_colormap()
    pal[1] = (1, 2, 3)
    data = mask_to_png(np.ones((2, 2), np.uint8), palette=pal)
    with Image.open(io.BytesIO(data)) as img:
        assert tuple(img.getpalette()[3:6]) == (1, 2, 3)


@pytest.mark.parametrize("bad", [np.zeros((2, 2), np.int32), np.zeros((2, 2, 3), np.uint8)])
def test_mask_to_png_rejects_non_2d_uint8(bad):
    with pytest.raises(ValueError):
        mask_to_png(bad)


@pytest.mark.parametrize("seed", range(4))
def test_png_round_trip_random_masks(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1, 80)), int(rng.integers(1, 80))
    mask = rng.integers(0, 256, size=(h, w)).astype(np.uint8)
    mask.flat[0] = IGNORE_INDEX
    back = png_to_mask(mask_to_png(mask))
    assert back.dtype == np.uint8
    assert back.shape == mask.shape
    assert np.array_equal(back, mask)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_png_to_mask_refuses_rgb():
    data = _png(Image.new("RGB", (4, 3), (128, 0, 0)))
    with pytest.raises(ValueError, match="mode"):
        png_to_mask(data)


def test_png_to_mask_accepts_grayscale():
    arr = np.array([[0, 1, 2], [7, 255, 3]], dtype=np.uint8)
    back = png_to_mask(_png(Image.fromarray(arr, mode="L")))
    assert back.dtype == np.uint8
    assert np.array_equal(back, arr)
