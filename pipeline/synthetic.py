"""Procedural labeled dataset: textured shapes on textured backgrounds.

Each image holds a few shapes of four classes (circle, rectangle, triangle,
star) in random colours and textures, overlapping, with sensor noise and a JPEG
round trip. Labels are VOC-style index PNGs: one class index per pixel and
255 on a one-pixel band along every class boundary, as VOC marks object borders.
Image ``i`` depends only on ``(seed, i)``, so any count reproduces the same prefix.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.palette import IGNORE_INDEX, mask_to_png

log = logging.getLogger(__name__)

CLASS_NAMES = ("background", "circle", "rectangle", "triangle", "star")
SIZES = ((160, 160), (128, 192), (192, 144))  # (height, width): several, so batching must bucket


def _texture(rng: np.random.Generator, h: int, w: int, strength: float) -> np.ndarray:
    """A random RGB texture in [0, 255]: flat, gradient, stripes, checker or blotches, mixing two colours
    with a weight of up to ``strength``."""
    base = rng.uniform(0, 255, 3)
    other = rng.uniform(0, 255, 3)
    kind = rng.integers(5)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:
        t = np.zeros((h, w), np.float32)
    elif kind == 1:
        a = rng.uniform(0, 2 * math.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy) / max(h, w)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    elif kind == 2:
        a = rng.uniform(0, math.pi)
        period = rng.uniform(4, 14)
        t = 0.5 + 0.5 * np.sin((np.cos(a) * xx + np.sin(a) * yy) * 2 * math.pi / period)
    elif kind == 3:
        cell = int(rng.integers(4, 12))
        t = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    else:
        coarse = rng.uniform(0, 1, (max(2, h // 16), max(2, w // 16))).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
    t = t[..., None] * rng.uniform(0.0, strength)
    return base * (1 - t) + other * t


def _shape_polygon(rng: np.random.Generator, cls: int, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    rot = rng.uniform(0, 2 * math.pi)
    if cls == 2:  # rectangle with a random aspect ratio
        aspect = rng.uniform(0.5, 1.0)
        pts = [(-1, -aspect), (1, -aspect), (1, aspect), (-1, aspect)]
    elif cls == 3:  # triangle, irregular
        angles = [0, 2 * math.pi / 3 + rng.uniform(-0.3, 0.3), 4 * math.pi / 3 + rng.uniform(-0.3, 0.3)]
        pts = [(math.cos(a), math.sin(a)) for a in angles]
    else:  # five-pointed star
        pts = []
        inner = rng.uniform(0.38, 0.5)
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else inner
            a = k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _place_shape(rng: np.random.Generator, cls: int, label: np.ndarray, h: int, w: int) -> np.ndarray:
    """The pixel mask of a new shape; shapes may overlap, but mostly they cover under a quarter of each other."""
    r = rng.uniform(9, 22)
    for _ in range(10):
        cx, cy = rng.uniform(r / 2, w - r / 2), rng.uniform(r / 2, h - r / 2)
        shape = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(shape)
        if cls == 1:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        else:
            draw.polygon(_shape_polygon(rng, cls, cx, cy, r), fill=255)
        inside = np.asarray(shape) > 127
        if (label[inside] > 0).mean() < 0.25:
            break
    return inside


def _ignore_borders(label: np.ndarray) -> np.ndarray:
    """Mark pixels whose 4-neighbourhood holds another class as 255 (VOC's border band)."""
    edge = np.zeros(label.shape, bool)
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    edge[:-1, :] |= label[:-1, :] != label[1:, :]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    out = label.copy()
    out[edge] = IGNORE_INDEX
    return out


def generate_sample(seed: int, index: int) -> tuple[Image.Image, np.ndarray]:
    """Image ``index`` of the dataset with ``seed``: an RGB image and its uint8 label."""
    rng = np.random.default_rng([seed, index])
    h, w = SIZES[int(rng.integers(len(SIZES)))]
    canvas = _texture(rng, h, w, strength=0.6)
    label = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(4, 12))):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        inside = _place_shape(rng, cls, label, h, w)
        canvas[inside] = _texture(rng, h, w, strength=0.3)[inside]  # milder: the outline must stay visible
        label[inside] = cls
    canvas += rng.normal(0, rng.uniform(2, 8), canvas.shape)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    if rng.uniform() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return img, _ignore_borders(label)


def make_dataset(out: str | Path, count: int, seed: int) -> Path:
    """Write ``count`` samples as ``images/<group>/<name>.jpg|png`` and ``labels/<group>/<name>.png``."""
    out = Path(out)
    for i in range(count):
        img, label = generate_sample(seed, i)
        rel = f"{i // 100:03d}/sample_{i:05d}"
        ext = "png" if i % 7 == 3 else "jpg"  # mostly JPEG, as cameras write, some PNG
        (out / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / "labels" / rel).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        if ext == "jpg":
            img.save(buf, format="JPEG", quality=92)
        else:
            img.save(buf, format="PNG")
        (out / "images" / f"{rel}.{ext}").write_bytes(buf.getvalue())
        (out / "labels" / f"{rel}.png").write_bytes(mask_to_png(label))
    log.info("wrote %d samples (seed %d) to %s", count, seed, out)
    return out
