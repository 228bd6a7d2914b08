"""Foreign weight layouts: their state dicts mapped onto segpipe's models, and wrapped into checkpoints.

Key mappings (foreign key -> segpipe key):

- torchvision's published segmentation checkpoints (``fcn_resnet50``, ``fcn_resnet101``, ``deeplabv3_resnet50``,
  ``deeplabv3_resnet101``, ``deeplabv3_mobilenet_v3_large``, ``lraspp_mobilenet_v3_large``): identity. The
  segpipe models of those names keep torchvision's ``backbone``, ``classifier`` and ``aux_classifier`` modules
  (``backbone.layer1.0.conv1.weight``, ``classifier.4.weight``, ``aux_classifier.0.weight``, ...).
- torchvision's ``deeplabv3_resnet50`` checkpoint into segpipe's ``deeplabv3``: identity, with the
  ``aux_classifier.*`` keys dropped (``deeplabv3`` has no auxiliary head).
- fcn.berkeleyvision.org's Caffe models as ported by wkentaro/pytorch-fcn (``fcn32s_from_caffe.pth``,
  ``fcn16s_from_caffe.pth``, ``fcn8s_from_caffe.pth``) into ``fcn32s``/``fcn16s``/``fcn8s``: identity. The
  segpipe modules use that port's attribute names (``conv1_1`` ... ``conv5_3``, ``fc6``, ``fc7``, ``score_fr``,
  ``score_pool4``, ``score_pool3``, ``upscore``, ``upscore2``, ``upscore16``, ``upscore_pool4``, ``upscore8``).
  The port's "at-once" FCN-8s scales pool3/pool4 by 1e-4/1e-2 inside its forward; its weights do not fit here.
"""

from __future__ import annotations

import torch

from pipeline.errors import CheckpointError
from pipeline.models.checkpoint import default_meta, save_checkpoint
from pipeline.models.registry import get_model
from pipeline.models.tv import TORCHVISION_MODELS

_IDENTITY = {"fcn32s", "fcn16s", "fcn8s", *TORCHVISION_MODELS}


def import_state_dict(arch: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` in a foreign layout (see the module docstring) with the keys segpipe's ``arch`` uses."""
    if arch == "deeplabv3":
        return {k: v for k, v in state_dict.items() if not k.startswith("aux_classifier.")}
    if arch in _IDENTITY:
        return dict(state_dict)
    known = ", ".join(sorted(_IDENTITY | {"deeplabv3"}))
    raise CheckpointError(f"no foreign weight layout is known for model {arch!r}; known: {known}")


def checkpoint_from_foreign(
    arch: str, state_dict: dict[str, torch.Tensor], class_names: tuple[str, ...] | list[str], format: str = "torch"
) -> bytes:
    """A segpipe checkpoint (``arch``'s default metadata) holding foreign weights; refused if they do not fit."""
    meta = default_meta(arch, class_names)
    model = get_model(arch, num_classes=meta.num_classes)
    try:
        model.load_state_dict(import_state_dict(arch, state_dict))
    except RuntimeError as e:
        raise CheckpointError(f"the weights do not fit {arch!r} with {meta.num_classes} classes: {e}") from e
    return save_checkpoint(model, meta, format=format)
