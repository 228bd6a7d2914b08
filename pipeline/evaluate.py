"""Re-evaluate a finished run: its masks against labels read with other settings, without touching the masks.

Labels are found by image id: a label file under ``labels_uri`` (the format's path for the id) or an entry
of a COCO JSON (matched by the id, else its basename). The results go to ``evaluations/<name>/``:
``metrics.json`` (the same definitions as the run's own), ``confusion_matrix.parquet`` and
``images.parquet`` (one EvaluationRow per image), ``metrics.json`` last.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import numpy as np

from pipeline import storage
from pipeline.config import EvaluateConfig
from pipeline.errors import ConfigError, InputError
from pipeline.geo.mask_files import decode_mask
from pipeline.labels import LabelError, validate_label
from pipeline.labels.reader import LabelReader
from pipeline.metrics import confusion_counts, metrics_report
from pipeline.outputs import (
    CONFUSION,
    EVALUATIONS,
    METRICS,
    EvaluationRow,
    Manifest,
    mask_path,
    part_paths,
    read_manifest,
    read_tables,
    reduce_confusion,
    to_table,
    write_confusion,
    write_json,
    write_table,
)
from pipeline.palette import IGNORE_INDEX
from pipeline.sources import Sample, get_layout
from pipeline.stats import sparse_confusion


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
    names = manifest.model.class_names
    labels = _Labels(cfg, manifest.config.get("input", {}).get("layout", "files"))
    ids = _image_ids(fs, root, manifest)
    with ThreadPoolExecutor(cfg.io_threads) as pool:
        rows = list(pool.map(lambda i: labels.compare(fs, root, *i, len(names)), ids))
    table = to_table(rows, EvaluationRow)
    mat, counts = reduce_confusion([table], len(names))
    out = storage.join(root, EVALUATIONS, evaluation_name(cfg))
    write_table(fs, storage.join(out, "images.parquet"), table)
    write_confusion(fs, storage.join(out, CONFUSION), mat, names)
    doc = {
        "run_id": manifest.run_id,
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": cfg.model_dump(mode="json", include={"labels_uri", "labels", "ignore_classes"}),
        "images": counts.images,
        "labeled_images": counts.labeled,
        "label_errors": counts.errors,
        **metrics_report(mat, names),
    }
    write_json(fs, storage.join(out, METRICS), doc)
    return doc | {"uri": storage.to_uri(fs, out)}


def _finished_manifest(fs, root: str, uri: str) -> Manifest:
    manifest = read_manifest(fs, root)  # a storage outage propagates: the evaluate task retries it
    if manifest is None:
        raise InputError(f"output {uri} holds no manifest.json: not a finished segpipe run")
    if not manifest.complete:
        raise InputError(f"output {uri}: the run is not complete (status {manifest.status!r})")
    return manifest


def _image_ids(fs, root: str, manifest: Manifest) -> list[tuple[str, str]]:
    """Ids of the images that got a mask (error rows have none), with their mask's suffix (.png or .tif), from
    the stats parts the manifest commits."""
    ids = []
    for table in read_tables(fs, part_paths(root, manifest), ["image_id", "mask_uri"]):
        pairs = zip(table["image_id"].to_pylist(), table["mask_uri"].to_pylist(), strict=True)
        ids += [(i, posixpath.splitext(m)[1]) for i, m in pairs if m]
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
        self.layout = get_layout(layout)  # how an image id names the file annotation tools know
        self.ignore = np.array(cfg.ignore_classes, dtype=np.int64)

    def compare(self, out_fs, out_root: str, image_id: str, suffix: str, num_classes: int) -> EvaluationRow:
        name = self.layout.sample_name(image_id)
        label_uri = None
        try:
            payload, label_uri = self.reader.fetch(Sample(image_id, name, "", None))
            if payload is None:
                return _row(image_id, label_uri)
            mask = decode_mask(out_fs.cat_file(mask_path(out_root, image_id, suffix)))
            label = self.reader.to_mask(payload, *mask.shape)
            validate_label(label, *mask.shape, num_classes)
        except LabelError as e:
            return _row(image_id, label_uri, error=f"label: {e}")
        if self.ignore.size:
            label = np.where(np.isin(label, self.ignore), IGNORE_INDEX, label).astype(np.uint8)
        return _row(image_id, label_uri, confusion=sparse_confusion(confusion_counts(label, mask, num_classes)))


def _row(image_id: str, label_uri: str | None, confusion: list | None = None, error: str | None = None):
    labeled = confusion is not None
    return EvaluationRow(image_id=image_id, label_uri=label_uri, labeled=labeled, confusion=confusion, error=error)
