"""Segmentation models: a registry, the architectures, and checkpoints with their metadata."""

from pipeline.models import unet_tiny as _unet_tiny  # noqa: F401  (registers the model)
from pipeline.models.registry import get_model, list_models, register_model

__all__ = ["get_model", "list_models", "register_model"]
