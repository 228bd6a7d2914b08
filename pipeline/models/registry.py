"""Model registry in torchvision's style: register by decorator, build by name. Other packages add models as
plugins, by entry points of the group ``segpipe.models`` (name = builder), e.g. in their pyproject.toml::

    [project.entry-points."segpipe.models"]
    my_net = "my_package.models:my_net"
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipeline.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", "models", entry_point_group="segpipe.models")
register_model = MODELS.register
list_models = MODELS.names


def get_model(name: str, **config) -> nn.Module:
    """Build the registered model ``name``; every model returns logits [N, C, H, W] at the input size."""
    return MODELS.get(name)(**config)
