"""FPN (Lin et al., CVPR 2017) on ResNet-50 with the semantic segmentation head of Panoptic FPN
(Kirillov et al., CVPR 2019).

Bottom-up: torchvision's ResNet-50, C2-C5 (strides 4-32). Top-down: 1x1 lateral convolutions to 256 channels,
nearest-neighbour upsampling of the coarser level to the lateral's size (x2, or one pixel less where a side
was odd), element-wise sum, and a 3x3 smoothing convolution giving P2-P5 of 256 channels
(torchvision.ops.FeaturePyramidNetwork, without the extra P6 level).

Head (Panoptic FPN, section 3): each level goes through as many stages as it needs to reach 1/4 scale (P2
one, P3 one, P4 two, P5 three); a stage is a 3x3 convolution to 128 channels, GroupNorm (32 groups), ReLU and,
except for P2, bilinear x2 upsampling (here to the next finer level's size, so odd sides stay aligned). The
four 128-channel maps are summed, a 1x1 convolution gives the class scores at 1/4 scale, and bilinear
upsampling brings them to the input size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.registry import register_model

_RESNET50_WIDTHS = (256, 512, 1024, 2048)  # C2-C5


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(32, cout), nn.ReLU(inplace=True))


class FPNSegmentation(nn.Module):
    stride = 32

    def __init__(self, num_classes: int = 21, channels: int = 256, head_channels: int = 128) -> None:
        super().__init__()
        # torchvision takes ~2 s to import; only the models that need it pay for it
        from torchvision.models import resnet50
        from torchvision.models._utils import IntermediateLayerGetter
        from torchvision.ops import FeaturePyramidNetwork

        layers = {f"layer{i}": f"c{i + 1}" for i in range(1, 5)}
        self.backbone = IntermediateLayerGetter(resnet50(weights=None), return_layers=layers)
        self.fpn = FeaturePyramidNetwork(list(_RESNET50_WIDTHS), channels)
        self.heads = nn.ModuleList(
            nn.ModuleList(_stage(channels if j == 0 else head_channels, head_channels) for j in range(max(level, 1)))
            for level in range(len(_RESNET50_WIDTHS))
        )
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pyramid = list(self.fpn(self.backbone(x)).values())  # P2..P5
        sizes = [p.shape[-2:] for p in pyramid]
        fused = 0
        for level, (p, stages) in enumerate(zip(pyramid, self.heads, strict=True)):
            for j, stage in enumerate(stages):
                p = stage(p)
                if level:
                    p = F.interpolate(p, size=sizes[level - 1 - j], mode="bilinear", align_corners=False)
            fused = fused + p
        return F.interpolate(self.classifier(fused), size=x.shape[-2:], mode="bilinear", align_corners=False)


@register_model("fpn")
def fpn(num_classes: int = 21) -> nn.Module:
    return FPNSegmentation(num_classes=num_classes)
