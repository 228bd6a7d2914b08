"""COCO instances JSON (one file for the whole dataset) rasterised to semantic index masks with pycocotools.

The semantic mask starts as background (0). Each non-crowd instance whose category is in the mapping paints its
class; a pixel claimed by instances of two different classes becomes 255 (ignore), as does every pixel of a crowd
region (iscrowd=1). Annotations of categories outside the mapping, crowd or not, are dropped: their pixels stay
background, as in torchvision's references/segmentation (FilterAndRemapCocoCategories).
"""

from __future__ import annotations

import json
import posixpath
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.errors import ConfigError
from pipeline.labels.base import LabelError, LabelFormat, check_size
from pipeline.labels.registry import register_label_format
from pipeline.palette import IGNORE_INDEX

if TYPE_CHECKING:
    from pipeline.config import LabelsConfig


@dataclass(frozen=True)
class CocoImage:
    """One image of a COCO JSON: its file_name, its recorded size and its annotations."""

    file_name: str
    height: int
    width: int
    annotations: tuple[dict[str, Any], ...]


class CocoIndex:
    """The images and categories of a COCO instances JSON, looked up by image name."""

    def __init__(self, images: list[CocoImage], categories: dict[int, str]):
        self.categories = categories
        self._by_name: dict[str, list[CocoImage]] = defaultdict(list)
        self._by_base: dict[str, list[CocoImage]] = defaultdict(list)
        for image in images:
            self._by_name[image.file_name].append(image)
            self._by_base[posixpath.basename(image.file_name)].append(image)

    @classmethod
    def from_json(cls, data: bytes) -> CocoIndex:
        """Parse the JSON's images, annotations and categories; ConfigError when it is not COCO instances JSON."""
        try:
            doc = json.loads(data)
            annotations = defaultdict(list)
            for ann in doc.get("annotations", []):
                annotations[ann["image_id"]].append(ann)
            images = [
                CocoImage(im["file_name"], int(im["height"]), int(im["width"]), tuple(annotations[im["id"]]))
                for im in doc["images"]
            ]
            categories = {int(cat["id"]): str(cat["name"]) for cat in doc["categories"]}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"labels: not a COCO instances JSON ({type(e).__name__}: {e})") from e
        return cls(images, categories)

    def lookup(self, name: str) -> CocoImage | None:
        """The image whose file_name is ``name``, else the one whose basename is ``name``'s; None when neither.

        A name matching several images (a basename shared by images in different folders) is a LabelError, not a
        guess.
        """
        found = self._by_name.get(name) or self._by_base.get(posixpath.basename(name), [])
        if len(found) > 1:
            raise LabelError(f"{name!r} matches {len(found)} COCO images: {[im.file_name for im in found][:5]}")
        return found[0] if found else None


def default_category_mapping(categories: dict[int, str]) -> dict[int, int]:
    """Categories sorted by id -> 1..K; 0 is background."""
    if len(categories) >= IGNORE_INDEX:
        raise ConfigError(f"labels: {len(categories)} COCO categories do not fit 1..254; set labels.mapping")
    return {cat_id: i for i, cat_id in enumerate(sorted(categories), start=1)}


def segmentation_mask(segm: list | dict, height: int, width: int) -> np.ndarray:
    """An annotation's segmentation (polygons, uncompressed or compressed RLE) as an HxW bool mask.

    Polygons of fewer than 3 points (or an odd number of coordinates) enclose nothing and are skipped.
    """
    if isinstance(segm, list):
        polygons = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return np.zeros((height, width), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    else:
        if list(segm["size"]) != [height, width]:
            raise LabelError(f"COCO RLE size {segm['size']} differs from the image's [{height}, {width}]")
        rle = mask_utils.frPyObjects(segm, height, width) if isinstance(segm["counts"], list) else segm
    return mask_utils.decode(rle).astype(bool)


def instances_to_mask(image: CocoImage, mapping: dict[int, int]) -> np.ndarray:
    """The image's semantic mask (see the module docstring for overlaps, crowds and unmapped categories)."""
    shape = (image.height, image.width)
    out = np.zeros(shape, np.uint8)
    claimed = np.zeros(shape, bool)
    crowd = np.zeros(shape, bool)
    for ann in image.annotations:
        cls = mapping.get(ann.get("category_id"))
        if cls is None:
            continue
        try:
            m = segmentation_mask(ann["segmentation"], *shape)
        except (ValueError, TypeError, KeyError) as e:
            raise LabelError(f"COCO annotation {ann.get('id')}: bad segmentation ({e})") from e
        if ann.get("iscrowd", 0):
            crowd |= m
            continue
        out[m & ~claimed] = cls
        out[m & claimed & (out != cls)] = IGNORE_INDEX
        claimed |= m
    out[crowd] = IGNORE_INDEX
    return out


@register_label_format("coco")
class CocoFormat(LabelFormat):
    """A COCO instances JSON; ``mapping`` maps category id -> class index (default: sorted ids -> 1..K)."""

    per_image = False
    options = frozenset({"mapping"})

    def __init__(self, index: CocoIndex, mapping: dict[int, int] | None = None):
        self.index = index
        self.mapping = default_category_mapping(index.categories) if mapping is None else mapping
        unknown = sorted(set(self.mapping) - set(index.categories))
        if unknown:
            raise ConfigError(f"labels.mapping names category ids {unknown[:10]} absent from the COCO categories")

    @classmethod
    def from_config(cls, cfg: LabelsConfig, dataset_file: bytes | None) -> CocoFormat:
        if dataset_file is None:
            raise ConfigError("labels.format coco needs the COCO instances JSON")
        return cls(CocoIndex.from_json(dataset_file), cfg.mapping)

    def path_for(self, image_rel: str) -> None:
        return None

    def lookup(self, name: str) -> CocoImage | None:
        return self.index.lookup(name)

    def to_mask(self, payload: CocoImage, height: int, width: int) -> np.ndarray:
        check_size(payload.height, payload.width, height, width)
        return instances_to_mask(payload, self.mapping)

    def class_names(self) -> list[str]:
        """Names by class index: 0 is "background" unless a category maps there; categories sharing an index are
        joined with "/"; an index no category maps to is ""."""
        by_index: dict[int, list[str]] = defaultdict(list)
        for cat_id, cls in sorted(self.mapping.items()):
            if cls != IGNORE_INDEX:
                by_index[cls].append(self.index.categories[cat_id])
        names = ["/".join(by_index.get(i, [])) for i in range(max(by_index, default=0) + 1)]
        names[0] = names[0] or "background"
        return names
