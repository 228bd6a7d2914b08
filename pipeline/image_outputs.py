"""One image's outputs, made from its mask a band of rows at a time: the mask file, the statistics, the polygons.

A windowed image (a huge TIFF) gives its finished rows straight from the stitcher (``rows``, a ``RowSink``),
so its mask is never whole in memory; an image decoded whole gives its mask at once (``add`` with row 0).
Either way every row goes once, top to bottom, to the same three consumers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.geo.mask_files import MaskWriter
from pipeline.geo.vectors import Polygonizer
from pipeline.palette import IGNORE_INDEX
from pipeline.stats import ImageStats, ImageStatsAccumulator

Validity = Callable[[int, int], "np.ndarray | None"]  # (top, rows) -> which pixels hold data; None: all do


@dataclass
class Finished:
    """What an image's outputs come to once its last row is in: the mask file is published."""

    stats: ImageStats
    vectors: pa.Table | None


class ImageOutputs:
    """Consumes one image's mask rows: writes them, counts them, traces them."""

    def __init__(
        self,
        writer: MaskWriter | None,  # None: the caller writes the mask itself (a small one, whole)
        stats: ImageStatsAccumulator,
        label: np.ndarray | None = None,
        polygons: Polygonizer | None = None,
        valid: Validity | None = None,
    ) -> None:
        self.writer, self.stats, self.label, self.polygons, self.valid = writer, stats, label, polygons, valid
        self._confidence = 0.0  # sum over pixels with data of the top probability
        self._counted = 0  # pixels with data whose confidence was summed

    def rows(self, top: int, labels: torch.Tensor, top_prob: torch.Tensor) -> None:
        """Finished rows from the stitcher: pixels without data become 255 and leave the confidence."""
        mask = labels.to(torch.uint8).cpu().numpy()
        valid = self.valid(top, mask.shape[0]) if self.valid else None
        if valid is None:  # summed where it lies (a GPU's probabilities stay there)
            self._confidence += float(top_prob.sum(dtype=torch.float64))
            self._counted += top_prob.numel()
        else:
            mask[~valid] = IGNORE_INDEX
            prob = top_prob.float().cpu().numpy()[valid]
            self._confidence += float(prob.sum(dtype=np.float64))
            self._counted += prob.size
        self.add(top, mask)

    def add(self, top: int, mask: np.ndarray) -> None:
        """Rows ``top``.. of the mask, in order."""
        if self.writer is not None:
            self.writer.write_rows(mask)
        self.stats.update(mask, self.label[top : top + mask.shape[0]] if self.label is not None else None)
        if self.polygons is not None:
            self.polygons.add_rows(mask)

    @property
    def mean_confidence(self) -> float:
        return self._confidence / max(self._counted, 1)

    def finish(self) -> Finished:
        """Publish the mask file; the statistics and polygons."""
        if self.writer is not None:
            self.writer.close()
        vectors = self.polygons.finish() if self.polygons is not None else None
        return Finished(self.stats.compute(), vectors)

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.discard()
