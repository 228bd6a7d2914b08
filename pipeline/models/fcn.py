"""FCN-32s, FCN-16s and FCN-8s on VGG16 (Long, Shelhamer & Darrell, CVPR 2015), as in fcn.berkeleyvision.org.

Layer names, shapes and crops follow the Caffe nets (``voc-fcn{32,16,8}s/net.py``) and their PyTorch port
wkentaro/pytorch-fcn, so that port's state dicts load with the identity key mapping. ``conv1_1`` pads by 100
so that any input size, however small, still yields a 7x7 ``fc6`` window; the crops then cut the upsampled
scores back to the input. The offsets are those Caffe's Crop layer derives from the layer geometry
(conv k3/p1 keeps coordinates, each 2x2 pool maps y -> 2y + 0.5, ``conv1_1`` shifts by -99, ``fc6`` by +3,
a deconvolution of kernel k and stride s maps y -> s*y + (k - 1)/2): e.g. for FCN-32s an ``upscore`` pixel z
sits over input pixel z - 19. The geometry is fixed, so the output covers the crop for every input size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.registry import register_model

# VGG16 configuration "D" (Simonyan & Zisserman, 2015): the widths of the 3x3 convolutions of the five blocks.
_VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def bilinear_kernel(in_ch: int, out_ch: int, size: int) -> torch.Tensor:
    """[in_ch, out_ch, size, size] weight of a ConvTranspose2d doing bilinear upsampling channel by channel.

    The formula of fcn.berkeleyvision.org's ``surgery.upsample_filt`` / pytorch-fcn's ``get_upsampling_weight``;
    like them it needs ``in_ch == out_ch``.
    """
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float64)
    filt = 1 - (og - center).abs() / factor
    weight = torch.zeros(in_ch, out_ch, size, size, dtype=torch.float64)
    weight[torch.arange(in_ch), torch.arange(out_ch)] = filt[:, None] * filt[None, :]
    return weight.float()


def _upsample(num_classes: int, size: int, stride: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(num_classes, num_classes, size, stride=stride, bias=False)


def _crop(x: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    h, w = like.shape[-2:]
    return x[:, :, offset : offset + h, offset : offset + w]


class _FCN(nn.Module):
    """The VGG16 trunk with ``fc6``/``fc7`` as convolutions and ``score_fr``; subclasses add the skips."""

    stride = 1  # any input size: the padding of conv1_1 and the crops align the output with the input

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        cin = 3
        for b, widths in enumerate(_VGG16_BLOCKS, 1):
            for i, cout in enumerate(widths, 1):
                self.add_module(f"conv{b}_{i}", nn.Conv2d(cin, cout, 3, padding=100 if b == i == 1 else 1))
                cin = cout
        self.fc6 = nn.Conv2d(512, 4096, 7)
        self.drop6 = nn.Dropout2d()
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.drop7 = nn.Dropout2d()
        self.score_fr = nn.Conv2d(4096, num_classes, 1)

    @torch.no_grad()
    def _init_weights(self) -> None:
        """The trunk as torchvision initialises VGG16 (convs Kaiming fan-out, fc N(0, 0.01)); scores zero and
        upsampling bilinear, as fcn.berkeleyvision.org does (there the trunk comes from ImageNet VGG16)."""
        for name, m in self.named_children():
            if isinstance(m, nn.ConvTranspose2d):
                m.weight.copy_(bilinear_kernel(m.in_channels, m.out_channels, m.kernel_size[0]))
            elif isinstance(m, nn.Conv2d):
                if name.startswith("score"):
                    nn.init.zeros_(m.weight)
                elif name.startswith("fc"):
                    nn.init.normal_(m.weight, 0, 0.01)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def _trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pool3 (1/8), pool4 (1/16) and score_fr (1/32) of the padded input."""
        pools = []
        for b, widths in enumerate(_VGG16_BLOCKS, 1):
            for i in range(1, len(widths) + 1):
                x = F.relu(getattr(self, f"conv{b}_{i}")(x), inplace=True)
            x = F.max_pool2d(x, 2, stride=2, ceil_mode=True)
            pools.append(x)
        x = self.drop6(F.relu(self.fc6(x), inplace=True))
        x = self.drop7(F.relu(self.fc7(x), inplace=True))
        return pools[2], pools[3], self.score_fr(x)


class FCN32s(_FCN):
    def __init__(self, num_classes: int = 21) -> None:
        super().__init__(num_classes)
        self.upscore = _upsample(num_classes, 64, 32)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, score = self._trunk(x)
        return _crop(self.upscore(score), 19, x).contiguous()


class FCN16s(_FCN):
    def __init__(self, num_classes: int = 21) -> None:
        super().__init__(num_classes)
        self.score_pool4 = nn.Conv2d(512, num_classes, 1)
        self.upscore2 = _upsample(num_classes, 4, 2)
        self.upscore16 = _upsample(num_classes, 32, 16)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, pool4, score = self._trunk(x)
        up2 = self.upscore2(score)
        h = up2 + _crop(self.score_pool4(pool4), 5, up2)
        return _crop(self.upscore16(h), 27, x).contiguous()


class FCN8s(_FCN):
    def __init__(self, num_classes: int = 21) -> None:
        super().__init__(num_classes)
        self.score_pool4 = nn.Conv2d(512, num_classes, 1)
        self.score_pool3 = nn.Conv2d(256, num_classes, 1)
        self.upscore2 = _upsample(num_classes, 4, 2)
        self.upscore_pool4 = _upsample(num_classes, 4, 2)
        self.upscore8 = _upsample(num_classes, 16, 8)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool3, pool4, score = self._trunk(x)
        up2 = self.upscore2(score)
        up4 = self.upscore_pool4(up2 + _crop(self.score_pool4(pool4), 5, up2))
        h = up4 + _crop(self.score_pool3(pool3), 9, up4)
        return _crop(self.upscore8(h), 31, x).contiguous()


@register_model("fcn32s")
def fcn32s(num_classes: int = 21) -> nn.Module:
    return FCN32s(num_classes)


@register_model("fcn16s")
def fcn16s(num_classes: int = 21) -> nn.Module:
    return FCN16s(num_classes)


@register_model("fcn8s")
def fcn8s(num_classes: int = 21) -> nn.Module:
    return FCN8s(num_classes)
