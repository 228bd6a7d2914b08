"""torchvision's published segmentation weights by name (``COCO_WITH_VOC_LABELS_V1``, ``DEFAULT``), loaded
through torchvision's own weights API: its download into ``$TORCH_HOME/hub/checkpoints``, its cache and its
hash check of a download. The weights' ``meta`` gives the class names and their ``transforms()`` the
normalisation, so no checkpoint needs to be written first.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from pipeline.errors import CheckpointError
from pipeline.models.checkpoint import ModelMeta, default_meta
from pipeline.models.registry import get_model
from pipeline.models.tv import TORCHVISION_MODELS


def weights_enum(arch: str, name: str):
    """torchvision's weights ``name`` of model ``arch``: a member name (``COCO_WITH_VOC_LABELS_V1``,
    ``DEFAULT``) or the full ``<Enum>.<MEMBER>``; ValueError listing the known ones otherwise."""
    if arch not in TORCHVISION_MODELS:
        raise ValueError(
            f"weights by name are torchvision's, for its segmentation models ({', '.join(TORCHVISION_MODELS)}), "
            f"not {arch!r}"
        )
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch)
    member = name.removeprefix(f"{weights.__name__}.")
    try:
        return weights[member]
    except KeyError:
        known = ", ".join([w.name for w in weights] + ["DEFAULT"])
        raise ValueError(f"{arch} has no weights {name!r}; torchvision has: {known}") from None


def pretrained_meta(arch: str, weights) -> ModelMeta:
    """The metadata of ``weights``: their categories, and the mean and std of their ``transforms()``."""
    transforms = weights.transforms()
    return replace(
        default_meta(arch, weights.meta["categories"]), mean=tuple(transforms.mean), std=tuple(transforms.std)
    )


def cached_file(weights) -> Path:
    """Where torch.hub keeps ``weights`` once downloaded (what ``load_state_dict_from_url`` reads)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def pretrained_state_dict(weights) -> dict[str, torch.Tensor]:
    """The tensors of ``weights``, downloaded once by torchvision (hash-checked) and read as weights only."""
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True, map_location="cpu")
    except Exception as e:  # no network, a failed hash check, a corrupt cache file
        raise CheckpointError(
            f"weights {weights}: cannot load {weights.url} (cached as {cached_file(weights)}): {e}"
        ) from e


def load_pretrained(arch: str, name: str, sha256: str | None = None) -> tuple[nn.Module, ModelMeta, str]:
    """``arch`` with torchvision's weights ``name``, its metadata, and the sha256 of the weights file.

    The file is downloaded once (hash-checked by torchvision) and read as weights only. ``sha256`` pins the
    file the driver checked: an actor whose cache holds other bytes refuses them."""
    weights = weights_enum(arch, name)
    state_dict = pretrained_state_dict(weights)
    digest = hashlib.sha256(cached_file(weights).read_bytes()).hexdigest()
    if sha256 is not None and digest != sha256.lower():
        raise CheckpointError(f"weights {weights} in {cached_file(weights)} have sha256 {digest}, not {sha256}")
    meta = pretrained_meta(arch, weights)
    model = get_model(arch, num_classes=meta.num_classes)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"weights {weights} ({cached_file(weights)}) do not fit {arch}: {e}") from e
    return model.eval(), meta, digest
