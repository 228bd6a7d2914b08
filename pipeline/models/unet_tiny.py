"""A small U-Net for the demo: four levels, concatenated skips, padded convolutions.

Padding ("same" 3x3 convolutions) keeps every level aligned, so the input only has
to be padded to a multiple of the total stride (16); the predictor does that.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.registry import register_model


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNetTiny(nn.Module):
    stride = 16

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        chans = [width, width * 2, width * 4, width * 8]
        self.down = nn.ModuleList()
        cin = 3
        for c in chans:
            self.down.append(_block(cin, c))
            cin = c
        self.bottom = _block(chans[-1], chans[-1])
        self.up = nn.ModuleList(_block(c * 2, max(c // 2, width)) for c in reversed(chans))
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2, ceil_mode=True)
        x = self.bottom(x)
        for block, skip in zip(self.up, reversed(skips), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


@register_model("unet_tiny")
def unet_tiny(num_classes: int = 5, width: int = 16) -> nn.Module:
    return UNetTiny(num_classes=num_classes, width=width)
