"""Labelme JSON labels, rasterised the way labelme's ``shape_to_mask`` draws each shape with PIL.ImageDraw.

Classes follow labelme2voc's labels.txt: ``__ignore__`` is 255, the other names are numbered from 0 in order, so
``_background_`` (when listed) is 0. Shapes are drawn in file order, later shapes over earlier ones; pixels no
shape covers are 0.
"""

from __future__ import annotations

import json
import math
import posixpath
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import ConfigError
from pipeline.labels.base import LabelError, LabelFormat, check_size
from pipeline.labels.registry import register_label_format
from pipeline.palette import IGNORE_INDEX

if TYPE_CHECKING:
    from pipeline.config import LabelsConfig

IGNORE_NAME = "__ignore__"
BACKGROUND_NAME = "_background_"
LINE_WIDTH = 10
POINT_RADIUS = 5
# shape_type -> (fewest, most) points, as labelme asserts them.
_POINT_COUNTS = {
    "polygon": (3, math.inf),
    "rectangle": (2, 2),
    "circle": (2, 2),
    "line": (2, 2),
    "linestrip": (2, math.inf),
    "point": (1, 1),
}


def class_values(classes: list[str]) -> dict[str, int]:
    """labelme2voc numbering: ``__ignore__`` -> 255, the other names -> 0, 1, ... in order."""
    names = [c for c in classes if c != IGNORE_NAME]
    if len(set(classes)) != len(classes):
        raise ConfigError(f"labels.classes has duplicates: {classes}")
    if BACKGROUND_NAME in names and names[0] != BACKGROUND_NAME:
        raise ConfigError(f"labels.classes: {BACKGROUND_NAME} must come first (after {IGNORE_NAME}), got {classes}")
    if len(names) > IGNORE_INDEX:
        raise ConfigError(f"labels.classes: {len(names)} classes do not fit 0..254")
    values = {name: i for i, name in enumerate(names)}
    if IGNORE_NAME in classes:
        values[IGNORE_NAME] = IGNORE_INDEX
    return values


def labelme_label_path(rel_image_path: str) -> str:
    """The image's relative path with a .json suffix."""
    return f"{posixpath.splitext(rel_image_path)[0]}.json"


def draw_shape(draw: ImageDraw.ImageDraw, shape_type: str | None, points: list, value: int) -> None:
    """Draw one shape with ``value`` exactly as labelme's shape_to_mask does (shape_type None is a polygon)."""
    shape_type = shape_type or "polygon"
    if shape_type not in _POINT_COUNTS:
        raise LabelError(f"labelme shape_type {shape_type!r} is not supported")
    try:
        xy = [(float(x), float(y)) for x, y in points]
    except (TypeError, ValueError) as e:
        raise LabelError(f"labelme {shape_type} points are not [x, y] pairs: {points!r}"[:200]) from e
    fewest, most = _POINT_COUNTS[shape_type]
    if not fewest <= len(xy) <= most:
        wanted = fewest if fewest == most else f"{fewest} or more"
        raise LabelError(f"labelme {shape_type} needs {wanted} points, got {len(xy)}")
    if shape_type == "circle":
        (cx, cy), (px, py) = xy
        d = math.hypot(cx - px, cy - py)
        draw.ellipse([cx - d, cy - d, cx + d, cy + d], outline=value, fill=value)
    elif shape_type == "rectangle":
        (x0, y0), (x1, y1) = xy
        # Corners in either order: recent Pillow rejects x1 < x0.
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=value, fill=value)
    elif shape_type in ("line", "linestrip"):
        draw.line(xy, fill=value, width=LINE_WIDTH)
    elif shape_type == "point":
        (cx, cy), r = xy[0], POINT_RADIUS
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=value, fill=value)
    else:
        draw.polygon(xy, outline=value, fill=value)


def labelme_to_mask(doc: dict, values: dict[str, int], height: int, width: int) -> np.ndarray:
    """Rasterise a parsed labelme document's shapes into an HxW index mask."""
    try:
        size = int(doc["imageHeight"]), int(doc["imageWidth"])
        shapes = list(doc["shapes"])
    except (KeyError, TypeError, ValueError) as e:
        raise LabelError(f"not a labelme JSON: needs imageHeight, imageWidth and shapes ({e!r})") from e
    check_size(*size, height, width)
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for shape in shapes:
        if not isinstance(shape, dict):
            raise LabelError(f"labelme shape is not an object: {shape!r}"[:200])
        label = shape.get("label")
        if label not in values:
            raise LabelError(f"labelme label {label!r} is not in labels.classes")
        draw_shape(draw, shape.get("shape_type"), shape.get("points", []), values[label])
    return np.asarray(img, dtype=np.uint8).copy()


@register_label_format("labelme")
class LabelmeFormat(LabelFormat):
    """``<stem>.json`` labelme files; ``classes`` in labelme2voc's order."""

    options = frozenset({"classes"})
    required_options = {"classes": "the class names (labelme2voc's labels.txt)"}

    def __init__(self, classes: list[str]):
        self.classes = list(classes)
        self.values = class_values(self.classes)

    @classmethod
    def from_config(cls, cfg: LabelsConfig, dataset_file: bytes | None) -> LabelmeFormat:
        return cls(cfg.classes)

    def path_for(self, image_rel: str) -> str:
        return labelme_label_path(image_rel)

    def to_mask(self, payload: bytes, height: int, width: int) -> np.ndarray:
        try:
            doc = json.loads(payload)
        except ValueError as e:
            raise LabelError(f"cannot decode labelme JSON: {e}") from e
        if not isinstance(doc, dict):
            raise LabelError("not a labelme JSON: the top level is not an object")
        return labelme_to_mask(doc, self.values, height, width)

    def class_names(self) -> list[str]:
        return [c for c in self.classes if c != IGNORE_NAME]
