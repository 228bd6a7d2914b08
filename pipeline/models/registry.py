"""Model registry in torchvision's style: register by decorator, build by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrapper(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"a model is already registered under the name {name!r}")
        _MODELS[name] = fn
        return fn

    return wrapper


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_model(name: str, **config) -> nn.Module:
    """Build the registered model ``name``; every model returns logits [N, C, H, W] at the input size."""
    try:
        fn = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}") from None
    return fn(**config)
