"""Test-time augmentation: the views of a window a model sees (flips, scales) and how each is undone."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

_FLIP_DIMS = {"horizontal": (-1,), "vertical": (-2,), "both": (-2, -1)}


@dataclass(frozen=True)
class View:
    flip: str | None = None  # horizontal, vertical, both
    scale: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.flip or 'plain'}@{self.scale:g}"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The batch as this view shows it: rescaled, then flipped."""
        if self.scale != 1.0:
            h, w = x.shape[-2:]
            size = (max(1, round(h * self.scale)), max(1, round(w * self.scale)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x.flip(_FLIP_DIMS[self.flip]) if self.flip else x

    def undo(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The view's logits back in the window's frame: unflipped, then resized to ``size``."""
        if self.flip:
            logits = logits.flip(_FLIP_DIMS[self.flip])
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def views(flips: Iterable[str], scales: Iterable[float]) -> tuple[View, ...]:
    """The plain view and every flip, at every scale."""
    return tuple(View(flip, scale) for scale in scales for flip in (None, *flips))
