"""Segmentation models: a registry, the architectures, and checkpoints with their metadata.

Importing this package registers every model; torchvision is imported only when a model that needs it is built.
"""

from pipeline.models import deeplab as _deeplab  # noqa: F401  (each module registers its models)
from pipeline.models import fcn as _fcn  # noqa: F401
from pipeline.models import fpn as _fpn  # noqa: F401
from pipeline.models import pointwise as _pointwise  # noqa: F401
from pipeline.models import tv as _tv  # noqa: F401
from pipeline.models import unet as _unet  # noqa: F401
from pipeline.models import unet_tiny as _unet_tiny  # noqa: F401
from pipeline.models.registry import get_model, list_models, register_model

__all__ = ["get_model", "list_models", "register_model"]
