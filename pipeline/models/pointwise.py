"""A per-pixel linear classifier: one 1x1 convolution from RGB to the classes.

It sees one pixel at a time, so it is no model for real scenes. It is here because it costs almost nothing:
``segpipe bench --datapath`` runs the real job with it, so that everything around the model (fetching,
decoding, normalising, argmax and confidence, PNG encoding, statistics, writes) is what is measured.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.registry import register_model


class Pointwise(nn.Module):
    stride = 1  # any input size goes through as it is

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


@register_model("pointwise")
def pointwise(num_classes: int) -> nn.Module:
    return Pointwise(num_classes)
