"""Foreign weights made into segpipe checkpoints (``segpipe import-weights``): a state dict from torchvision,
pytorch-fcn or a user's own training run, read as tensors only, mapped onto a registry model and saved
with the metadata a run needs.

Reading (``read_state_dict``): ``.safetensors``, or a ``torch.save`` file loaded with ``weights_only=True``.
A training run's ``{"model": ..., "optimizer": ..., "epoch": ...}`` is unwrapped to its state dict (under
``state_dict``, ``model_state_dict``, ``model``, ``net`` or ``weights``), and the prefixes that DataParallel
(``module.``) and ``torch.compile`` (``_orig_mod.``) add to every key are dropped.

Key mappings (foreign key -> segpipe key), in ``import_state_dict``:

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
- any other model (a plugin's, ``unet``, a run of ``segpipe train``): identity.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.errors import CheckpointError
from pipeline.models.checkpoint import ModelMeta, default_meta, read_tensors, save_checkpoint
from pipeline.models.exported import is_program, save_program
from pipeline.models.pretrained import pretrained_meta, pretrained_state_dict, weights_enum
from pipeline.models.registry import get_model

if TYPE_CHECKING:
    from pipeline.config import ImportConfig

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
# Prefixes wrappers add to every key: DataParallel / DistributedDataParallel, then torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "module.")
_SHOWN = 8  # keys named per kind of mismatch before "and N more"
# ImportConfig fields that set ModelMeta fields of the same name
_META_FIELDS = {"class_names", "mean", "std", "palette", "input_policy", "size", "stride", "train_crop"}


def read_state_dict(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or ``torch.save`` file, unwrapped (see the module docstring)."""
    return _unwrap(read_tensors(data, source, what="weights"), source)


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and not _is_state_dict(obj):
        inner = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise CheckpointError(
                f"{source} is not a state dict, and holds none under {', '.join(_NESTED_KEYS)} "
                f"(its keys: {', '.join(map(str, list(obj)[:_SHOWN]))})"
            )
        obj = inner
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        raise CheckpointError(f"{source} holds no state dict (name -> tensor)")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k.removeprefix(prefix): v for k, v in obj.items()}
    return obj


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def import_state_dict(arch: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` in a foreign layout (see the module docstring) with the keys segpipe's ``arch`` uses."""
    if arch == "deeplabv3":
        return {k: v for k, v in state_dict.items() if not k.startswith("aux_classifier.")}
    return dict(state_dict)


def mismatches(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``state_dict`` from loading into ``model``, by key: missing, unexpected, wrong shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in own)
    shapes = [
        f"{k} (file {list(v.shape)}, model {list(own[k].shape)})"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    return [
        f"{what} ({len(keys)}): {', '.join(keys[:_SHOWN])}"
        + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
        if keys
    ]


def checkpoint_from_foreign(
    arch: str,
    state_dict: dict[str, torch.Tensor],
    class_names: tuple[str, ...] | list[str],
    format: str = "torch",
    meta: ModelMeta | None = None,
) -> bytes:
    """A segpipe checkpoint holding foreign weights, with ``meta`` (default: ``arch``'s default metadata);
    CheckpointError naming every key that does not fit."""
    meta = meta or default_meta(arch, class_names)
    with torch.device("meta"):  # the shapes alone, to compare; the real model is built once they fit
        shapes = get_model(arch, num_classes=meta.num_classes, **meta.arch_kwargs)
    weights = import_state_dict(arch, state_dict)
    if problems := mismatches(shapes, weights):
        raise CheckpointError(
            f"the weights do not fit {arch!r} with {meta.num_classes} classes: " + "; ".join(problems)
        )
    model = get_model(arch, num_classes=meta.num_classes, **meta.arch_kwargs)
    model.load_state_dict(weights)
    return save_checkpoint(model, meta, format=format)


def import_weights(cfg: ImportConfig, source: bytes | None) -> bytes:
    """The checkpoint ``cfg`` asks for, from the bytes at its ``source_uri`` (None: torchvision's ``weights``).

    A torch.export program stays a program, with the metadata inside; anything else becomes a segpipe
    checkpoint of ``cfg.model``. CheckpointError says what does not fit."""
    given = {k: v for k, v in cfg.model_dump(include=_META_FIELDS).items() if v is not None}
    if source is not None and is_program(source):
        if cfg.model is not None or cfg.weights is not None:
            raise CheckpointError(f"{cfg.source_uri} is a torch.export program: it needs no model or weights")
        return save_program(source, given, cfg.source_uri)
    if cfg.model is None:
        raise CheckpointError("model: name the registry model the weights are for")
    if source is None:
        state_dict = pretrained_state_dict(weights_enum(cfg.model, cfg.weights))
    else:
        state_dict = read_state_dict(source, cfg.source_uri)
    meta = _import_meta(cfg, given)
    return checkpoint_from_foreign(cfg.model, state_dict, meta.class_names, cfg.checkpoint_format, meta)


def _import_meta(cfg: ImportConfig, given: dict[str, Any]) -> ModelMeta:
    """``cfg.model``'s default metadata (with the classes and normalisation of ``cfg.weights``), then ``given``."""
    pretrained = pretrained_meta(cfg.model, weights_enum(cfg.model, cfg.weights)) if cfg.weights else None
    names = given.pop("class_names", None) or (pretrained.class_names if pretrained else None)
    if not names:
        raise CheckpointError("class_names: name the classes (--classes), in index order")
    meta = default_meta(cfg.model, names, **cfg.arch_kwargs)
    if pretrained is not None:
        meta = replace(meta, mean=pretrained.mean, std=pretrained.std)
    return replace(meta, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
