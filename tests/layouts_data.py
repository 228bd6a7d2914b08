"""Test datasets in every input layout and label format, built from the procedural samples.

Each builder returns the files to upload (relative path -> bytes), the job fields that read them,
and the expected index label of every image id, so a test can check each stats row's confusion
against ``confusion(mask written, expected label)``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as coco_mask

from pipeline.palette import IGNORE_INDEX, mask_to_png
from pipeline.synthetic import generate_sample

SEED = 7
COUNT = 8
LABELME_CLASSES = ["__ignore__", "_background_", "circle", "rectangle", "triangle", "star"]
COCO_CATEGORY_IDS = {1: 11, 2: 12, 3: 13, 4: 14}  # demo class -> a COCO-style sparse category id
# Cityscapes labelIds of road, sidewalk, building, wall, fence: trainIds 0..4.
CITYSCAPES_LABEL_IDS = {0: 7, 1: 8, 2: 11, 3: 12, 4: 13, IGNORE_INDEX: 0}


@dataclass
class Built:
    files: dict[str, bytes]  # relative path under the dataset prefix -> content
    fields: dict  # job config fields; URIs relative to the dataset prefix, joined by the test
    expected: dict[str, np.ndarray] = field(default_factory=dict)  # image id -> expected index label


def samples() -> list[tuple[str, str, bytes, np.ndarray]]:
    """``(stem, extension, encoded image, index label)`` of each procedural sample: mostly JPEG, some PNG."""
    out = []
    for i in range(COUNT):
        img, label = generate_sample(SEED, i)
        fmt = "PNG" if i % 4 == 3 else "JPEG"
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out.append((f"s{i:03d}", fmt.lower().replace("jpeg", "jpg"), buf.getvalue(), label))
    return out


def png_l(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


# Per-image label payloads: (bytes, expected index label) from a procedural label.


def index_png(label: np.ndarray) -> tuple[bytes, np.ndarray]:
    return mask_to_png(label), label


def binary(label: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Foreground = circles, stored as 255; read with the binary format's default mapping {0: 0, 255: 1}."""
    return png_l(np.where(label == 1, 255, 0)), (label == 1).astype(np.uint8)


def cityscapes(label: np.ndarray) -> tuple[bytes, np.ndarray]:
    lut = np.zeros(256, np.uint8)
    for train_id, label_id in CITYSCAPES_LABEL_IDS.items():
        lut[train_id] = label_id
    return png_l(lut[label]), label


def labelme(label: np.ndarray, stem: str, ext: str) -> bytes:
    """A Labelme file in labelme's own schema with one shape of every kind, placed from the label's size."""
    h, w = label.shape
    shapes = [
        ("rectangle", "rectangle", [[0.1 * w, 0.1 * h], [0.45 * w, 0.4 * h]]),
        ("triangle", "polygon", [[0.5 * w, 0.1 * h], [0.9 * w, 0.2 * h], [0.6 * w, 0.5 * h]]),
        ("circle", "circle", [[0.3 * w, 0.7 * h], [0.3 * w + 12.5, 0.7 * h]]),
        ("star", "line", [[0.6 * w, 0.6 * h], [0.95 * w, 0.9 * h]]),
        ("star", "point", [[0.8 * w, 0.4 * h]]),
        ("__ignore__", "polygon", [[0.2 * w, 0.2 * h], [0.3 * w, 0.2 * h], [0.3 * w, 0.3 * h], [0.2 * w, 0.3 * h]]),
    ]
    doc = {
        "version": "5.5.0",
        "flags": {},
        "shapes": [
            {"label": lbl, "points": pts, "group_id": None, "description": "", "shape_type": kind, "flags": {}}
            for lbl, kind, pts in shapes
        ],
        "imagePath": f"{stem}.{ext}",
        "imageData": None,
        "imageHeight": h,
        "imageWidth": w,
    }
    return json.dumps(doc).encode()


def uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's uncompressed RLE (as crowd annotations store it): column-major runs, starting with zeros."""
    flat = m.flatten(order="F").astype(np.uint8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"counts": ([0] + runs) if flat[0] else runs, "size": list(m.shape)}


def coco_json(entries: list[tuple[str, np.ndarray]]) -> bytes:
    """Instances JSON: one compressed-RLE instance per class present, the 255 band as a crowd region."""
    images, annotations = [], []
    for image_id, (file_name, label) in enumerate(entries, start=1):
        h, w = label.shape
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for cls, cat in COCO_CATEGORY_IDS.items():
            m = label == cls
            if m.any():
                rle = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode()
                annotations.append(_ann(len(annotations) + 1, image_id, cat, rle, 0, m))
        band = label == IGNORE_INDEX
        if band.any():
            annotations.append(_ann(len(annotations) + 1, image_id, 11, uncompressed_rle(band), 1, band))
    categories = [
        {"id": cat, "name": f"class{cls}", "supercategory": "shape"} for cls, cat in COCO_CATEGORY_IDS.items()
    ]
    return json.dumps({"images": images, "annotations": annotations, "categories": categories}).encode()


def _ann(ann_id: int, image_id: int, cat: int, rle: dict, crowd: int, m: np.ndarray) -> dict:
    ys, xs = np.nonzero(m)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "segmentation": rle,
        "area": int(m.sum()),
        "bbox": bbox,
        "iscrowd": crowd,
    }


FORMATS = ("index_png", "binary", "cityscapes", "labelme", "coco")
LAYOUTS = ("files", "webdataset", "parquet")
LABEL_FIELDS = {
    "index_png": {"format": "index_png"},
    "binary": {"format": "binary"},
    "cityscapes": {"format": "cityscapes"},
    "labelme": {"format": "labelme", "classes": LABELME_CLASSES},
    "coco": {"format": "coco", "mapping": {cat: cls for cls, cat in COCO_CATEGORY_IDS.items()}},
}
TAR_LABEL_SUFFIX = {"index_png": "seg.png", "binary": "seg.png", "cityscapes": "labelids.png", "labelme": "json"}


def _payload(fmt: str, stem: str, ext: str, label: np.ndarray) -> tuple[bytes, np.ndarray]:
    if fmt == "labelme":
        from pipeline.config import LabelsConfig
        from pipeline.labels import label_format

        data = labelme(label, stem, ext)
        return data, label_format(LabelsConfig(**LABEL_FIELDS["labelme"])).to_mask(data, *label.shape)
    return {"index_png": index_png, "binary": binary, "cityscapes": cityscapes}[fmt](label)


def build(layout: str, fmt: str) -> Built:
    """The procedural samples laid out as ``layout`` with labels in ``fmt``."""
    built = Built({}, {"labels": LABEL_FIELDS[fmt]})
    coco_entries = []
    tars: dict[str, list[dict]] = {}
    rows = []
    for i, (stem, ext, image, label) in enumerate(samples()):
        if layout == "files":
            rel = f"city/{stem}_leftImg8bit.{ext}" if fmt == "cityscapes" else f"{i % 2}/{stem}.{ext}"
            built.files[f"images/{rel}"] = image
            image_id = name = rel
        elif layout == "webdataset":
            tar = f"train-{i // 4:03d}"
            tars.setdefault(tar, []).append({"__key__": stem, ext: image})
            image_id, name = f"{tar}/{stem}.{ext}", f"{stem}.{ext}"
        else:
            image_id = name = f"{stem}.{ext}"
            rows.append({"id": image_id, "image": image, "label": None})
        if fmt == "coco":
            coco_entries.append((name, label))
            built.expected[image_id] = label
            continue
        data, expected = _payload(fmt, stem, ext, label)
        built.expected[image_id] = expected
        if layout == "files":
            built.files[f"labels/{_label_rel(fmt, rel)}"] = data
        elif layout == "webdataset":
            tars[tar][-1][TAR_LABEL_SUFFIX[fmt]] = data
        else:
            rows[-1]["label"] = data
    if fmt == "coco":
        built.files["labels/instances.json"] = coco_json(coco_entries)
        built.fields["labels_uri"] = "labels/instances.json"
    elif layout == "files":
        built.fields["labels_uri"] = "labels"
    if layout == "files":
        built.fields["input_uri"] = "images"
    elif layout == "webdataset":
        built.files.update({f"shards/{tar}.tar": _tar(members) for tar, members in tars.items()})
        built.fields["input_uri"] = "shards"
        if fmt != "coco":
            built.fields["input"] = {"label_suffix": TAR_LABEL_SUFFIX[fmt]}
    else:
        built.files["table/part-0.parquet"] = _parquet(rows)
        built.fields["input_uri"] = "table"
        built.fields["input"] = {"id_column": "id"} | ({} if fmt == "coco" else {"label_column": "label"})
    return built


def _label_rel(fmt: str, rel: str) -> str:
    stem = rel.rsplit(".", 1)[0]
    if fmt == "cityscapes":
        return stem.removesuffix("_leftImg8bit") + "_gtFine_labelIds.png"
    return f"{stem}.json" if fmt == "labelme" else f"{stem}.png"


def _tar(members: list[dict]) -> bytes:
    """A tar shard written by the webdataset library itself."""
    import webdataset

    buf = io.BytesIO()
    with webdataset.TarWriter(buf) as sink:
        for sample in members:
            sink.write(sample)
    return buf.getvalue()


def _parquet(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(
        rows, schema=pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.binary())])
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=4)
    return buf.getvalue()
