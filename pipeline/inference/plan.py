"""How a job's images go through its model: the inference settings resolved against the checkpoint.

The config may leave the tile unset: then it is the crop the checkpoint was trained on, the fixed input size
of a "resize" model, or 512 x 512. ``InferencePlan.windows`` decides per image between whole and slide.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import InferenceConfig
from pipeline.inference.tta import View, views
from pipeline.inference.windows import Window, whole, window_rows
from pipeline.models.checkpoint import ModelMeta

DEFAULT_TILE = (512, 512)


@dataclass(frozen=True)
class InferencePlan:
    mode: str  # auto, whole or slide
    tile: tuple[int, int]
    overlap: float
    blend: str  # gaussian or mean
    views: tuple[View, ...]  # test-time augmentations; the plain view alone when TTA is off
    stride: int = 1  # the model's: "auto" compares the image padded to it with the tile

    def windows(self, height: int, width: int) -> list[list[Window]]:
        """The rows of windows of one image: one window when it goes through whole."""
        if self.mode == "whole" or (self.mode == "auto" and self.fits(height, width)):
            return whole(height, width)
        return window_rows(height, width, self.tile, self.overlap)

    def fits(self, height: int, width: int) -> bool:
        """The image, padded to the model's stride, is no larger than a tile."""
        s = self.stride
        return -(-height // s) * s <= self.tile[0] and -(-width // s) * s <= self.tile[1]

    def describe(self) -> dict:
        """The resolved settings, as the manifest records them."""
        return {
            "mode": self.mode,
            "tile": list(self.tile),
            "overlap": self.overlap,
            "blend": self.blend,
            "tta": [view.name for view in self.views],
        }


def plan_inference(cfg: InferenceConfig, meta: ModelMeta) -> InferencePlan:
    tile = cfg.tile or meta.train_crop or (meta.size if meta.input_policy == "resize" else None) or DEFAULT_TILE
    return InferencePlan(
        mode=cfg.mode,
        tile=(int(tile[0]), int(tile[1])),
        overlap=cfg.overlap,
        blend=cfg.blend,
        views=views(cfg.tta.flips, cfg.tta.scales),
        stride=meta.stride if meta.input_policy == "pad" else 1,
    )
