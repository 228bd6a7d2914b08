"""Checkpoints: weights plus the metadata a run needs (classes, palette, normalisation, input policy).

Two formats, told apart by their first bytes when read:

- "torch": a plain dict (format, meta, state_dict, extra) saved with ``torch.save`` and read back with
  ``torch.load(weights_only=True)``, so a pickle that would run code is refused;
- "safetensors": the state dict as a safetensors file, whose header metadata holds the ModelMeta as JSON
  under "segpipe.meta" and the extra dict as JSON under "segpipe.extra". A safetensors file without
  "segpipe.meta" (someone else's weights) is refused; ``weights_import`` turns such weights into a checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import safetensors.torch
import torch
from torch import nn

from pipeline.errors import CheckpointError
from pipeline.models.registry import get_model
from pipeline.palette import voc_colormap
from pipeline.storage import location_error

FORMAT = "segpipe-checkpoint/1"
SAFETENSORS_META_KEY = "segpipe.meta"
SAFETENSORS_EXTRA_KEY = "segpipe.extra"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PICKLED_MODULE_HINT = (
    "segpipe does not unpickle them, as unpickling can run any code. Export the model instead: "
    "torch.export.save(torch.export.export(model.eval(), (example_batch,), dynamic_shapes=...), 'model.pt2'), "
    "then `segpipe import-weights model.pt2 --classes NAMES --out model.pt2`; or save model.state_dict() and "
    "import that with `segpipe import-weights`"
)


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
    train_crop: tuple[int, int] | None = None  # (h, w) crops it was trained on: the default inference tile

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def palette_array(self):
        pal = voc_colormap()
        for i, rgb in enumerate(self.palette):
            pal[i] = rgb
        return pal


def default_meta(arch: str, class_names: tuple[str, ...] | list[str], **arch_kwargs: Any) -> ModelMeta:
    """The metadata a new ``arch`` model starts with: ImageNet normalisation, the VOC palette, and the "pad"
    policy with the model's own ``stride``, read from a copy built on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = get_model(arch, num_classes=len(class_names), **arch_kwargs)
    return ModelMeta(
        arch=arch,
        class_names=tuple(class_names),
        input_policy="pad",
        stride=getattr(model, "stride", 1),
        arch_kwargs=dict(arch_kwargs),
        palette=tuple(tuple(int(c) for c in rgb) for rgb in voc_colormap(len(class_names))),
    )


def meta_to_dict(meta: ModelMeta) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(meta).items()}


def save_checkpoint(
    model: nn.Module, meta: ModelMeta, extra: dict[str, Any] | None = None, format: str = "torch"
) -> bytes:
    """The checkpoint's bytes, "torch" or "safetensors" (then ``extra`` must be JSON-serialisable)."""
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if format == "safetensors":
        metadata = {
            SAFETENSORS_META_KEY: json.dumps(meta_to_dict(meta)),
            SAFETENSORS_EXTRA_KEY: json.dumps(extra or {}),
        }
        return safetensors.torch.save({k: v.contiguous() for k, v in state_dict.items()}, metadata=metadata)
    if format != "torch":
        raise ValueError(f"unknown checkpoint format {format!r}; use 'torch' or 'safetensors'")
    payload = {"format": FORMAT, "meta": meta_to_dict(meta), "state_dict": state_dict, "extra": extra or {}}
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def meta_from_dict(raw: dict) -> ModelMeta:
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
        train_crop=tuple(int(v) for v in raw["train_crop"]) if raw.get("train_crop") else None,
    )


def read_tensors(data: bytes, source: str, what: str = "checkpoint") -> Any:
    """What a safetensors file or a ``torch.save`` file holds, read as tensors only (``weights_only=True``);
    CheckpointError otherwise, one that says how to export a pickled module instead."""
    try:
        if is_safetensors(data):
            return _read_safetensors(data)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # weights_only refused a class: a pickled module, most likely
            raise CheckpointError(f"{what} {source} holds pickled Python objects; {PICKLED_MODULE_HINT}") from e
        raise CheckpointError(f"cannot read {what} {source}: {_first_line(e)}") from e
    except Exception as e:  # torch raises RuntimeError, EOFError... for bad files; safetensors its own
        raise CheckpointError(f"cannot read {what} {source}: {_first_line(e)}") from e


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def is_safetensors(data: bytes) -> bool:
    """A safetensors file opens with the little-endian u64 length of its JSON header, then the header."""
    return len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8


def _read_safetensors(data: bytes) -> dict[str, Any]:
    state_dict = safetensors.torch.load(data)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    metadata = header.get("__metadata__") or {}
    if SAFETENSORS_META_KEY not in metadata:
        return state_dict  # someone else's weights: load_checkpoint says how to import them
    return {"format": FORMAT, "meta": json.loads(metadata[SAFETENSORS_META_KEY]), "state_dict": state_dict}


def read_checkpoint(resolve: Callable[[str], tuple[Any, str]], uri: str) -> bytes:
    """The bytes of the checkpoint at ``uri`` (``resolve`` is a config's ``resolve``: URI -> (fs, path)).

    CheckpointError when it is missing, denied or not a usable URI; StorageUnavailable (retried by the
    caller's step) when its store does not answer.
    """
    try:
        fs, path = resolve(uri)
        return fs.cat_file(path)
    except Exception as e:  # botocore's client errors are not OSErrors: classify them
        raise location_error(e, f"cannot read checkpoint {uri}: {e}", CheckpointError) from e


def load_checkpoint(
    data: bytes,
    source: str,
    expect_arch: str | None = None,
    expect_classes: int | None = None,
    sha256: str | None = None,
) -> tuple[nn.Module, ModelMeta]:
    """Build the model a checkpoint describes, in eval mode, from its bytes (either format).

    ``sha256`` is checked before anything is parsed; ``expect_arch`` and ``expect_classes`` against the metadata.
    """
    if sha256 is not None and (actual := sha256_hex(data)) != sha256.lower():
        raise CheckpointError(f"checkpoint {source} has sha256 {actual}, but {sha256} was expected")
    payload = read_tensors(data, source)
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(
            f"checkpoint {source} is a plain state dict, without segpipe's metadata: make it a checkpoint with "
            f"`segpipe import-weights {source} --model ARCH --classes NAMES --out CHECKPOINT`"
        )
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {source} is not a {FORMAT} file")
    try:
        meta = meta_from_dict(payload["meta"])
        state_dict = payload["state_dict"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {source} lacks or garbles its metadata: {e!r}") from e
    if expect_arch not in (None, meta.arch) or expect_classes not in (None, meta.num_classes):
        asked = repr(expect_arch or meta.arch) + ("" if expect_classes is None else f" with {expect_classes} classes")
        raise CheckpointError(
            f"checkpoint {source} is for {meta.arch!r} with {meta.num_classes} classes, but the config asks for {asked}"
        )
    try:
        model = get_model(meta.arch, num_classes=meta.num_classes, **meta.arch_kwargs)
        model.load_state_dict(state_dict)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {source} does not fit model {meta.arch!r}: {e}") from e
    return model.eval(), meta
