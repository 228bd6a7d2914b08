"""Re-evaluate a finished run: its masks against labels read with other settings, without touching the masks.

Labels are found by image id: a label file under ``labels_uri`` (the format's path for the id) or an entry
of a COCO JSON (matched by the id, else its basename). The results go to ``evaluations/<name>/``:
``metrics.json`` (the same definitions as the run's own), ``confusion_matrix.parquet`` and
``images.parquet`` (one row per image), ``metrics.json`` last.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import EvaluateConfig
from pipeline.errors import ConfigError, InputError
from pipeline.labels import LabelError, validate_label
from pipeline.labels.reader import LabelReader
from pipeline.metrics import confusion_counts, metrics_report
from pipeline.outputs import CONFUSION, MANIFEST, METRICS, committed_parts, mask_path, write_confusion, write_json
from pipeline.palette import IGNORE_INDEX, png_to_mask
from pipeline.sources import Sample
from pipeline.stats import sparse_confusion

EVALUATIONS = "evaluations"
IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("label_uri", pa.string()),
        ("labeled", pa.bool_()),
        ("confusion", pa.list_(pa.struct([("gt", pa.int32()), ("pred", pa.int32()), ("count", pa.int64())]))),
        ("error", pa.string()),
    ]
)


def evaluation_name(cfg: EvaluateConfig) -> str:
    """``cfg.name``, else a digest of the settings: the same evaluation always lands in the same folder."""
    if cfg.name:
        return cfg.name
    key = cfg.model_dump(mode="json", include={"labels_uri", "labels", "ignore_classes"})
    return "eval-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def evaluate_output(cfg: EvaluateConfig) -> dict:
    """Evaluate every mask of the finished run at ``cfg.output_uri``; returns the metrics document."""
    fs, root = cfg.resolve(cfg.output_uri)
    manifest = _finished_manifest(fs, root, cfg.output_uri)
    names = manifest["model"]["class_names"]
    labels = _Labels(cfg, manifest["config"].get("input", {}).get("layout", "files"))
    ids = _image_ids(fs, root)
    with ThreadPoolExecutor(cfg.io_threads) as pool:
        rows = list(pool.map(lambda i: labels.compare(fs, root, i, len(names)), ids))
    mat = np.zeros((len(names), len(names)), np.int64)
    for row in rows:
        for cell in row["confusion"] or ():
            mat[cell["gt"], cell["pred"]] += cell["count"]
    out = storage.join(root, EVALUATIONS, evaluation_name(cfg))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), buf, compression="zstd")
    storage.write_bytes(fs, storage.join(out, "images.parquet"), buf.getvalue())
    write_confusion(fs, storage.join(out, CONFUSION), mat, names)
    doc = {
        "run_id": manifest["run_id"],
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": cfg.model_dump(mode="json", include={"labels_uri", "labels", "ignore_classes"}),
        "images": len(rows),
        "labeled_images": sum(r["labeled"] for r in rows),
        "label_errors": sum(r["error"] is not None for r in rows),
        **metrics_report(mat, names),
    }
    write_json(fs, storage.join(out, METRICS), doc)
    return doc | {"uri": storage.to_uri(fs, out)}


def _finished_manifest(fs, root: str, uri: str) -> dict:
    try:
        manifest = json.loads(fs.cat_file(storage.join(root, MANIFEST)))
    except FileNotFoundError:
        raise InputError(f"output {uri} holds no manifest.json: not a finished segpipe run") from None
    except Exception as e:  # unreachable store, denied access, a manifest that is not JSON
        raise InputError(f"output {uri}: cannot read manifest.json: {e}") from e
    if manifest.get("status") != "complete":
        raise InputError(f"output {uri}: the run is not complete (status {manifest.get('status')!r})")
    return manifest


def _image_ids(fs, root: str) -> list[str]:
    """Ids of the images that got a mask (error rows have none), from the run's stats parts."""
    ids = []
    for path in sorted(committed_parts(fs, root).values()):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["image_id", "mask_uri"])
        ids += [i for i, m in zip(table["image_id"].to_pylist(), table["mask_uri"].to_pylist(), strict=True) if m]
    return ids


class _Labels:
    """The evaluation's labels: found as a run finds them (loose files by id, or COCO entries), then ignored
    classes masked out."""

    def __init__(self, cfg: EvaluateConfig, layout: str) -> None:
        try:
            # Labels come from labels_uri, whatever the run's input was.
            self.reader = LabelReader(cfg.labels, cfg.resolve(cfg.labels_uri), "files")
        except (OSError, LabelError, ConfigError) as e:
            raise ConfigError(f"labels {cfg.labels_uri}: {e}") from e
        self.tar_names = layout == "webdataset"  # a tar image's id is <tar>/<member>; COCO knows the member
        self.ignore = np.array(cfg.ignore_classes, dtype=np.int64)

    def compare(self, out_fs, out_root: str, image_id: str, num_classes: int) -> dict:
        row = {"image_id": image_id, "label_uri": None, "labeled": False, "confusion": None, "error": None}
        name = posixpath.basename(image_id) if self.tar_names else image_id
        try:
            payload, row["label_uri"] = self.reader.fetch(Sample(image_id, name, "", None))
            if payload is None:
                return row
            mask = png_to_mask(out_fs.cat_file(mask_path(out_root, image_id)))
            label = self.reader.to_mask(payload, *mask.shape)
            validate_label(label, *mask.shape, num_classes)
        except LabelError as e:
            row["error"] = f"label: {e}"
            return row
        if self.ignore.size:
            label = np.where(np.isin(label, self.ignore), IGNORE_INDEX, label).astype(np.uint8)
        row.update(labeled=True, confusion=sparse_confusion(confusion_counts(label, mask, num_classes)))
        return row
