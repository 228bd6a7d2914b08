"""decode_rgb: every common mode becomes HxWx3 uint8, EXIF orientation applied, bad bytes are DecodeError;
too-large images are refused from the header; conversion goes strip by strip."""

from __future__ import annotations

import io
import os
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline import images
from pipeline.images import DecodeError, ImageTooLarge, decode_rgb, default_max_image_pixels, image_pixels


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _check(arr: np.ndarray, h: int, w: int) -> None:
    assert isinstance(arr, np.ndarray)
    assert arr.shape == (h, w, 3)
    assert arr.dtype == np.uint8
    assert arr.flags.c_contiguous and arr.flags.writeable


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


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB but stops at the start of its pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))[:6])


def _whole_image_rgb(data: bytes) -> np.ndarray:
    """The conversion as it was before strips: whole-image Pillow operations (the reference)."""
    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA").convert("RGB")
        elif img.mode.startswith("I;16") or img.mode in ("I", "F"):
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I") else max(float(arr.max()), 1.0)
            img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
        elif img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8).copy()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_exif_transpose(orientation, fmt):
    rng = np.random.default_rng(orientation)
    img = Image.fromarray(rng.integers(0, 256, (5, 9, 3)).astype(np.uint8))  # not square: rotations show
    exif = img.getexif()
    exif[0x0112] = orientation
    data = _encode(img, fmt, exif=exif)
    with Image.open(io.BytesIO(data)) as src:
        assert src.getexif()[0x0112] == orientation
        expected = np.asarray(ImageOps.exif_transpose(src))
    out = decode_rgb(data)
    _check(out, *expected.shape[:2])
    assert np.array_equal(out, expected)


def test_too_large_is_refused_with_the_setting_to_raise():
    data = _encode(Image.new("RGB", (100, 60)), "PNG")
    with pytest.raises(ImageTooLarge, match=r"100x60 = 6,000 pixels, above max_image_pixels \(5,000\)") as e:
        decode_rgb(data, max_pixels=5000)
    assert "--max-image-pixels" in str(e.value)
    assert isinstance(e.value, DecodeError)
    _check(decode_rgb(data, max_pixels=6000), 60, 100)


def test_size_is_checked_from_the_header_before_decoding():
    message = (
        "image is 20000x20000 = 400,000,000 pixels, above max_image_pixels (100,000,000); "
        "raise max_image_pixels in the job config (--max-image-pixels) to segment it"
    )
    with pytest.raises(ImageTooLarge) as e:
        decode_rgb(_png_header(20000, 20000), max_pixels=100_000_000)
    assert str(e.value) == message
    # the same truncated data under the limit is a decode error: the refusal above came before decoding
    small = _png_header(100, 60)
    with pytest.raises(ImageTooLarge):
        decode_rgb(small, max_pixels=5000)
    with pytest.raises(DecodeError, match="cannot decode image") as e:
        decode_rgb(small, max_pixels=6000)
    assert not isinstance(e.value, ImageTooLarge)


def test_image_pixels_reads_the_header_only():
    assert image_pixels(_encode(Image.new("RGB", (100, 60)), "PNG")) == 6000
    assert image_pixels(_encode(Image.new("RGB", (33, 21)), "JPEG")) == 693
    assert image_pixels(_png_header(20000, 20000)) == 400_000_000
    assert image_pixels(b"not an image at all") is None
    assert image_pixels(b"") is None


def _mode_image(mode: str, h: int, w: int) -> tuple[Image.Image, str]:
    """A random ``mode`` image and a format that keeps the mode."""
    rng = np.random.default_rng(len(mode))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16)), "PNG"
    if mode == "I":
        return Image.fromarray(rng.integers(-1000, 90_000, (h, w)).astype(np.int32)), "TIFF"
    if mode == "F":
        arr = rng.uniform(-1.0, 3.0, (h, w)).astype(np.float32)
        arr[-1, -1] = 10.0  # the maximum sits in the last strip: every strip must use the global one
        return Image.fromarray(arr), "TIFF"
    if mode in ("P", "P+transparency"):
        img = Image.fromarray(rng.integers(0, 256, (h, w)).astype(np.uint8), mode="L").convert("P")
        img.putpalette(rng.integers(0, 256, 768).astype(np.uint8).tobytes())
        if mode == "P+transparency":
            img.info["transparency"] = 3
        return img, "PNG"
    bands = len(Image.new(mode, (1, 1)).getbands())
    arr = rng.integers(0, 256, (h, w, bands)).astype(np.uint8)
    img = Image.fromarray(arr[..., 0], mode="L") if bands == 1 else Image.frombytes(mode, (w, h), arr.tobytes())
    return img, ("JPEG" if mode == "CMYK" else "PNG")


@pytest.mark.parametrize("mode", ["L", "P", "P+transparency", "RGBA", "LA", "RGB", "I;16", "I", "F", "CMYK"])
def test_strips_give_the_whole_image_conversion(mode, monkeypatch):
    h, w = 23, 257
    monkeypatch.setattr(images, "STRIP_PIXELS", 1000)  # 3 rows a strip: 8 strips, the last one of 2 rows
    img, fmt = _mode_image(mode, h, w)
    data = _encode(img, fmt)
    with Image.open(io.BytesIO(data)) as back:
        assert back.mode == mode.split("+")[0]
    out = decode_rgb(data)
    _check(out, h, w)
    assert np.array_equal(out, _whole_image_rgb(data))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_only_the_output_array_is_full_size(mode, monkeypatch):
    # tracemalloc sees numpy's and Python's allocations, not Pillow's own image memory
    monkeypatch.setattr(images, "STRIP_PIXELS", 50_000)
    data = _encode(Image.new(mode, (2000, 1500)), "PNG")
    tracemalloc.start()
    try:
        out = decode_rgb(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _check(out, 1500, 2000)
    assert peak < 1.2 * out.nbytes  # np.asarray(whole image).copy() alone would be 2x


def test_pillow_image_is_freed_before_the_oriented_copy(monkeypatch):
    def pillow_blocks_in_use() -> int:
        stats = Image.core.get_stats()
        return stats["allocated_blocks"] - stats["freed_blocks"] - stats["blocks_cached"]

    img = Image.new("RGB", (30, 20))
    exif = img.getexif()
    exif[0x0112] = 6
    data = _encode(img, "PNG", exif=exif)
    del img
    before, seen, contiguous = pillow_blocks_in_use(), [], np.ascontiguousarray

    def spy(a, *args, **kwargs):
        seen.append(pillow_blocks_in_use())
        return contiguous(a, *args, **kwargs)

    monkeypatch.setattr(np, "ascontiguousarray", spy)
    _check(decode_rgb(data), 30, 20)
    assert seen == [before]


def test_default_max_image_pixels_follows_the_cgroup_limit(tmp_path, monkeypatch):
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(images, "CGROUP_MEMORY_LIMITS", (str(tmp_path / "absent"), str(limit)))
    for text, expected in [
        ("max\n", physical),
        ("9223372036854771712\n", physical),  # cgroup v1's "unlimited"
        ("1048576\n", 1 << 20),
    ]:
        limit.write_text(text)
        assert images.memory_limit_bytes() == expected
        assert default_max_image_pixels() == expected // 16
