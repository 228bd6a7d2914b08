"""torchvision's segmentation models, built with ``weights=None, weights_backbone=None`` (nothing is downloaded).

``TorchvisionSegmentation`` takes over the torchvision model's ``backbone``, ``classifier`` and
``aux_classifier`` under the same names, so its state-dict keys are torchvision's, unchanged: a published
torchvision checkpoint loads as it is. Its ``forward`` is torchvision's without the auxiliary branch and
returns the main logits ``out`` as a tensor. The FCN and DeepLabV3 models keep the auxiliary head by default
(``aux_loss=True``), as the published COCO-with-VOC-labels checkpoints have it, so their layout and parameter
counts match torchvision's (e.g. fcn_resnet50 35,322,218); ``aux_loss=False`` drops it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.registry import register_model

# name in torchvision.models.segmentation: (output stride, aux_loss of the published weights; None: no aux head)
TORCHVISION_MODELS = {
    "fcn_resnet50": (8, True),
    "fcn_resnet101": (8, True),
    "deeplabv3_resnet50": (8, True),
    "deeplabv3_resnet101": (8, True),
    "deeplabv3_mobilenet_v3_large": (16, True),
    "lraspp_mobilenet_v3_large": (16, None),
}


class TorchvisionSegmentation(nn.Module):
    """A torchvision segmentation model whose forward returns only the main logits, at the input size."""

    def __init__(self, model: nn.Module, stride: int) -> None:
        super().__init__()
        from torchvision.models.segmentation.lraspp import LRASPP

        self.backbone = model.backbone
        self.classifier = model.classifier
        self.aux_classifier = getattr(model, "aux_classifier", None)  # kept for the layout, never run
        self.head_takes_all_features = isinstance(model, LRASPP)  # LRASPP's head reads "low" and "high"
        # Any input size works; padding to the output stride keeps the bilinear upsampling aligned.
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        scores = self.classifier(features if self.head_takes_all_features else features["out"])
        return F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _builder(name: str, stride: int, aux: bool | None) -> Callable[..., nn.Module]:
    def build(num_classes: int = 21, aux_loss: bool | None = aux) -> nn.Module:
        # torchvision takes ~2 s to import; only the models that need it pay for it
        from torchvision.models import segmentation

        kwargs = {} if aux_loss is None else {"aux_loss": aux_loss}
        model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
        return TorchvisionSegmentation(model, stride)

    return build


for _name, (_stride, _aux) in TORCHVISION_MODELS.items():
    register_model(_name)(_builder(_name, _stride, _aux))
