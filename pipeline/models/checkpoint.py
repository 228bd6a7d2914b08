"""Checkpoints: weights plus the metadata a run needs (classes, palette, normalisation, input policy).

A checkpoint is a plain dict saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``, so a pickle that would run code is refused.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.errors import CheckpointError
from pipeline.models.registry import get_model
from pipeline.palette import voc_colormap

FORMAT = "segpipe-checkpoint/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelMeta:
    """What travels with a model: how to feed it and how to name and draw its classes."""

    arch: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # "pad": pad bottom/right to a multiple of ``stride``; "resize": resize to ``size`` (h, w).
    input_policy: str = "pad"
    stride: int = 1
    size: tuple[int, int] | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    palette: tuple[tuple[int, int, int], ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def palette_array(self):
        pal = voc_colormap()
        for i, rgb in enumerate(self.palette):
            pal[i] = rgb
        return pal


def save_checkpoint(model: nn.Module, meta: ModelMeta, extra: dict[str, Any] | None = None) -> bytes:
    payload = {
        "format": FORMAT,
        "meta": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(meta).items()},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _meta_from_dict(raw: dict) -> ModelMeta:
    return ModelMeta(
        arch=raw["arch"],
        class_names=tuple(raw["class_names"]),
        mean=tuple(raw["mean"]),
        std=tuple(raw["std"]),
        input_policy=raw["input_policy"],
        stride=int(raw["stride"]),
        size=tuple(raw["size"]) if raw.get("size") else None,
        arch_kwargs=dict(raw.get("arch_kwargs") or {}),
        palette=tuple(tuple(int(c) for c in rgb) for rgb in raw.get("palette") or ()),
    )


def load_checkpoint(data: bytes, source: str, expect_arch: str | None = None) -> tuple[nn.Module, ModelMeta]:
    """Build the model a checkpoint describes, in eval mode, from its bytes."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {source}: {reason}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {source} is not a {FORMAT} file")
    try:
        meta = _meta_from_dict(payload["meta"])
        state_dict = payload["state_dict"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {source} lacks or garbles its metadata: {e!r}") from e
    if expect_arch is not None and meta.arch != expect_arch:
        raise CheckpointError(
            f"checkpoint {source} is for model {meta.arch!r}, but the config asks for {expect_arch!r}"
        )
    try:
        model = get_model(meta.arch, num_classes=meta.num_classes, **meta.arch_kwargs)
        model.load_state_dict(state_dict)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {source} does not fit model {meta.arch!r}: {e}") from e
    return model.eval(), meta
