"""DeepLabV3 (Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation", 2017) on ResNet-50.

The last two ResNet stages use dilation instead of stride (output stride 8), and ASPP has four 256-channel
branches, a 1x1 convolution and 3x3 convolutions of rates 12, 24 and 36 (the paper's rates for output stride 8),
plus image-level pooling; their concatenation is projected to 256 channels, then a 3x3 convolution and a 1x1
classifier follow and the scores are upsampled bilinearly to the input size. Built from torchvision's blocks
(ResNet-50, IntermediateLayerGetter, DeepLabHead) with torchvision's module names: this is torchvision's
``deeplabv3_resnet50`` without the auxiliary head, so its state dicts load once ``aux_classifier.*`` is dropped.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.registry import register_model


class DeepLabV3(nn.Module):
    # Any input size works; padding to the output stride keeps the bilinear upsampling aligned.
    stride = 8

    def __init__(self, num_classes: int = 21) -> None:
        super().__init__()
        # torchvision takes ~2 s to import; only the models that need it pay for it
        from torchvision.models import resnet50
        from torchvision.models._utils import IntermediateLayerGetter
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead

        resnet = resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
        self.backbone = IntermediateLayerGetter(resnet, return_layers={"layer4": "out"})
        self.classifier = DeepLabHead(2048, num_classes, atrous_rates=(12, 24, 36))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.classifier(self.backbone(x)["out"])
        return F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)


@register_model("deeplabv3")
def deeplabv3(num_classes: int = 21) -> nn.Module:
    return DeepLabV3(num_classes=num_classes)
