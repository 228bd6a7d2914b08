"""decode_rgb: every common mode becomes HxWx3 uint8, EXIF orientation applied, bad bytes are DecodeError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.images import DecodeError, decode_rgb


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _check(arr: np.ndarray, h: int, w: int) -> None:
    assert isinstance(arr, np.ndarray)
    assert arr.shape == (h, w, 3)
    assert arr.dtype == np.uint8


def test_rgb_jpeg():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (21, 33, 3)).astype(np.uint8)
    _check(decode_rgb(_encode(Image.fromarray(src), "JPEG")), 21, 33)


def test_rgb_png_is_lossless():
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (9, 13, 3)).astype(np.uint8)
    out = decode_rgb(_encode(Image.fromarray(src), "PNG"))
    assert np.array_equal(out, src)


def test_grayscale_png():
    src = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7) * 7
    out = decode_rgb(_encode(Image.fromarray(src, mode="L"), "PNG"))
    _check(out, 5, 7)
    for ch in range(3):
        assert np.array_equal(out[..., ch], src)


def test_rgba_png():
    img = Image.new("RGBA", (6, 4), (10, 20, 30, 255))
    out = decode_rgb(_encode(img, "PNG"))
    _check(out, 4, 6)
    assert tuple(out[0, 0]) == (10, 20, 30)


def test_palette_png():
    img = Image.new("P", (8, 3))
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 1), 1)
    out = decode_rgb(_encode(img, "PNG"))
    _check(out, 3, 8)
    assert tuple(out[1, 1]) == (200, 100, 50)
    assert tuple(out[0, 0]) == (0, 0, 0)


def test_cmyk_jpeg():
    data = _encode(Image.new("CMYK", (10, 6), (0, 255, 255, 0)), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "CMYK"
    out = decode_rgb(data)
    _check(out, 6, 10)
    r, g, b = (int(v) for v in out[3, 5])
    assert r > 200 and g < 60 and b < 60  # C=0, M=Y=255: red


def test_16bit_png():
    src = np.full((5, 7), 40000, dtype=np.uint16)
    src[0, 0] = 65535
    src[0, 1] = 0
    data = _encode(Image.fromarray(src), "PNG")
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode.startswith("I")  # I;16 in current Pillow
    out = decode_rgb(data)
    _check(out, 5, 7)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (0, 0, 0)
    assert abs(int(out[2, 2, 0]) - 40000 / 65535 * 255) <= 1
    assert out[2, 2, 0] == out[2, 2, 1] == out[2, 2, 2]


def test_exif_orientation_is_applied():
    # 40 wide, 20 high; left half red, right half blue
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(img, "JPEG", exif=exif, quality=95)
    out = decode_rgb(data)
    _check(out, 40, 20)
    # after a clockwise quarter turn the left (red) half is on top
    top, bottom = out[5, 10].astype(int), out[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_no_exif_keeps_size():
    _check(decode_rgb(_encode(Image.new("RGB", (40, 20)), "JPEG")), 20, 40)


def test_empty_bytes():
    with pytest.raises(DecodeError, match="empty file"):
        decode_rgb(b"")


def test_random_bytes():
    rng = np.random.default_rng(3)
    with pytest.raises(DecodeError, match="cannot decode image"):
        decode_rgb(rng.integers(0, 256, 4096).astype(np.uint8).tobytes())


def test_truncated_jpeg():
    rng = np.random.default_rng(4)
    data = _encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)), "JPEG")
    decode_rgb(data)  # the whole file decodes
    with pytest.raises(DecodeError):
        decode_rgb(data[: len(data) // 2])


def test_decode_error_is_a_value_error():
    assert issubclass(DecodeError, ValueError)
