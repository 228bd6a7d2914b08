"""Where each image's label comes from, fetched on the IO threads and converted by its format.

A label is carried in the input itself (a tar member, a Parquet column), or is a file under
``labels_uri`` matched by the image's relative path (a layout with ``label_files``, such as loose files),
or is an entry of one dataset file for the whole dataset (a format that is not ``per_image``, such as
COCO's JSON), matched by file name.
"""

from __future__ import annotations

import fsspec
import numpy as np

from pipeline import storage
from pipeline.config import LabelsConfig
from pipeline.labels import LabelFormat, get_label_format, label_format
from pipeline.sources import Sample, get_layout
from pipeline.sources.files import read_optional

Location = tuple[fsspec.AbstractFileSystem, str]


def load_label_format(cfg: LabelsConfig, location: Location | None) -> LabelFormat:
    """The label format; a dataset-wide file (the COCO JSON at ``location``) is read and indexed once here."""
    dataset_file = None
    if not get_label_format(cfg.format).per_image and location is not None:
        fs, path = location
        dataset_file = fs.cat_file(path)
    return label_format(cfg, dataset_file)


class LabelReader:
    """Labels in ``cfg``'s format, under ``location`` (``(fs, root)``: a folder, or the dataset file) if given;
    ``layout`` is the input's registered layout name."""

    def __init__(self, cfg: LabelsConfig, location: Location | None, layout: str) -> None:
        self.format = load_label_format(cfg, location)
        self.fs, self.root = location or (None, None)
        self.by_path = get_layout(layout).label_files and self.format.per_image and self.fs is not None

    def fetch(self, sample: Sample) -> tuple[object | None, str | None]:
        """``(payload, uri)`` of the sample's label, or ``(None, None)`` when it has none."""
        if sample.label is not None:
            return sample.label, sample.label_uri or sample.source_uri
        if self.by_path:
            path = storage.join(self.root, self.format.path_for(sample.image_id))
            data = read_optional(self.fs, path)
            return (data, storage.to_uri(self.fs, path)) if data is not None else (None, None)
        if self.fs is not None and not self.format.per_image:
            entry = self.format.lookup(sample.name)
            return (entry, f"{storage.to_uri(self.fs, self.root)}#{sample.name}") if entry is not None else (None, None)
        return None, None

    def to_mask(self, payload: object, height: int, width: int) -> np.ndarray:
        return self.format.to_mask(payload, height, width)
