"""Merging window probabilities into one image's mask, band by band, in bounded memory.

As MONAI's ``sliding_window_inference``: each window's softmax probabilities, times an importance map
(gaussian, centre-weighted, so seams vanish; or flat), are added into an fp32 accumulator with the weights;
a pixel's class is the argmax of sum / weight and its confidence that maximum. The accumulator holds one
row of windows (tile height x image width), not the image: windows arrive row by row, and when the next row
begins, the pixels above its top edge are touched by no later window, so they are finished and dropped.
Probabilities are kept classes last ([h, w, C]): a window adds whole pixels, and finishing reduces along a
contiguous axis (on CPU the channels-first layout made the merge twice as slow). Since every pixel's weight
is positive, its class is the argmax of the sums themselves; only the top value is divided.
"""

from __future__ import annotations

import functools
from typing import Protocol

import numpy as np
import torch

from pipeline.inference.windows import Window

SIGMA_SCALE = 0.125  # of the window size, as MONAI's default
FINISH_PIXELS = 1 << 20  # pixels whose class is decided at once


@functools.cache
def _importance(h: int, w: int, blend: str, device: torch.device) -> torch.Tensor:
    """[h, w] weights: a gaussian with sigma = SIGMA_SCALE x size, peak 1 (or all ones for ``mean``)."""
    if blend == "mean":
        return torch.ones(h, w, device=device)
    axes = [torch.exp(-0.5 * ((torch.arange(n, device=device) - (n - 1) / 2) / (SIGMA_SCALE * n)) ** 2) for n in (h, w)]
    weights = torch.outer(*axes)
    weights /= weights.max()
    return weights.clamp_(min=weights[weights > 0].min().item())  # no pixel of a window weighs nothing


class RowSink(Protocol):
    """Where an image's finished rows go, top to bottom, each row once: classes and top probabilities."""

    def rows(self, top: int, labels: torch.Tensor, top_prob: torch.Tensor) -> None: ...


class MaskArray:
    """Finished rows kept as one mask in memory, for an image that was decoded whole."""

    def __init__(self, height: int, width: int) -> None:
        self.mask = np.empty((height, width), np.uint8)
        self._confidence = 0.0  # sum over finished pixels of the top probability

    def rows(self, top: int, labels: torch.Tensor, top_prob: torch.Tensor) -> None:
        self.mask[top : top + labels.shape[0]] = labels.to(torch.uint8).cpu().numpy()
        self._confidence += float(top_prob.sum(dtype=torch.float64))

    @property
    def mean_confidence(self) -> float:
        return self._confidence / self.mask.size


class Stitcher:
    """One image's mask and confidence, built from its windows' probabilities given in row order; finished
    rows go to ``sink``."""

    def __init__(self, rows: list[list[Window]], num_classes: int, blend: str, sink: RowSink) -> None:
        self.height = rows[-1][0].y + rows[-1][0].h
        self.width = rows[0][-1].x + rows[0][-1].w
        self.sink = sink
        self.left = sum(len(row) for row in rows)  # windows not merged yet
        self.single = self.left == 1
        self._num_classes, self._blend = num_classes, blend
        self._band_height = rows[0][0].h
        self._top = 0  # image row of the accumulator's first row
        self._sum: torch.Tensor | None = None  # [band height, width, C] weighted probabilities
        self._weight: torch.Tensor | None = None  # [band height, width]

    @property
    def done(self) -> bool:
        return self.left == 0

    def add(self, window: Window, probs: torch.Tensor) -> None:
        """Merge one window's [h, w, C] probabilities; every window of a row before any of the next row."""
        self.left -= 1
        if self.single:  # the whole image in one window: nothing to blend
            self._finish(probs, None, 0)
            return
        if self._sum is None:
            self._sum = probs.new_zeros(self._band_height, self.width, self._num_classes)
            self._weight = probs.new_zeros(self._band_height, self.width)
        if window.y > self._top:
            self._advance(window.y)
        weight = _importance(window.h, window.w, self._blend, probs.device)
        rows, cols = slice(window.y - self._top, window.y - self._top + window.h), slice(window.x, window.x + window.w)
        self._sum[rows, cols].addcmul_(probs, weight[..., None])
        self._weight[rows, cols] += weight
        if self.done:
            self._advance(self.height)

    def _advance(self, top: int) -> None:
        """Finish the rows above image row ``top`` (no later window touches them) and move the band down."""
        n = top - self._top
        finished = min(n, self.height - self._top)
        self._finish(self._sum[:finished], self._weight[:finished], self._top)
        if top < self.height:
            _shift_up(self._sum, n)
            _shift_up(self._weight, n)
        else:  # the last row: the band is no longer needed
            self._sum = self._weight = None
        self._top = top

    def _finish(self, sums: torch.Tensor, weights: torch.Tensor | None, top: int) -> None:
        """Class and top probability of the rows of ``sums / weights`` (``sums`` alone when None), to the sink
        from image row ``top`` on; a few rows at a time, so that no temporary spans the band."""
        step = max(1, FINISH_PIXELS // self.width)
        for r in range(0, sums.shape[0], step):
            top_sum, labels = sums[r : r + step].max(dim=-1)
            top_prob = top_sum if weights is None else top_sum / weights[r : r + step]
            self.sink.rows(top + r, labels, top_prob)


def _shift_up(t: torch.Tensor, n: int) -> None:
    """Move ``t``'s rows from ``n`` on to the top, in place, and zero the ``n`` rows freed at the bottom. In
    chunks of at most ``n`` rows, so that no copy reads what it writes (and no clone of the band is made)."""
    size = t.shape[0]
    for start in range(0, size - n, n):
        length = min(n, size - n - start)
        t[start : start + length] = t[start + n : start + n + length]
    t[size - n :] = 0
