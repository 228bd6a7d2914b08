"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015): the original encoder-decoder, 64 to 1024 channels.

Five levels of two 3x3 convolutions with ReLU; 2x2 max-pooling down, 2x2 up-convolutions halving the
channels up, the encoder's features concatenated as skips, a 1x1 classifier. Weights start as the paper
says: Gaussian with standard deviation sqrt(2 / fan-in).

Padding: the paper uses valid (unpadded) convolutions, so a 572x572 tile gives 388x388 scores and each
skip is centre-cropped before the concatenation. Here every 3x3 convolution pads by 1 ("same"), as most
re-implementations do: levels stay aligned, no crop is needed, and an input whose sides are multiples of the
total stride 16 gives scores of its own size. ``forward`` zero-pads other sizes bottom/right to a multiple of
16 and crops the scores back, which is what the predictor's "pad" policy does before calling it.

``batch_norm=True`` puts a BatchNorm after each convolution (bias dropped), which the paper predates; the
default is off, as in the paper. The paper's dropout at the end of the contracting path is left out.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.registry import register_model


def _double_conv(cin: int, cout: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (cin, cout):
        layers.append(nn.Conv2d(c, cout, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    stride = 16

    def __init__(self, num_classes: int = 21, base: int = 64, batch_norm: bool = False) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(5)]  # 64, 128, 256, 512, 1024
        self.down = nn.ModuleList()
        cin = 3
        for w in widths:
            self.down.append(_double_conv(cin, w, batch_norm))
            cin = w
        self.upconv = nn.ModuleList(nn.ConvTranspose2d(w, w // 2, 2, stride=2) for w in reversed(widths[1:]))
        self.up = nn.ModuleList(_double_conv(w, w // 2, batch_norm) for w in reversed(widths[1:]))
        self.head = nn.Conv2d(base, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                # fan-in: cin*k*k inputs per output; cin for the non-overlapping 2x2 stride-2 up-convolution
                k = 1 if isinstance(m, nn.ConvTranspose2d) else m.kernel_size[0] * m.kernel_size[1]
                nn.init.normal_(m.weight, 0, (2 / (m.in_channels * k)) ** 0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % self.stride, 0, (-h) % self.stride))
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for upconv, block, skip in zip(self.upconv, self.up, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([skip, upconv(x)], dim=1))
        return self.head(x)[..., :h, :w]


@register_model("unet")
def unet(num_classes: int = 21, base: int = 64, batch_norm: bool = False) -> nn.Module:
    return UNet(num_classes=num_classes, base=base, batch_norm=batch_norm)
