"""Hugging Face ``transformers`` semantic-segmentation models: ``model: hf:<repo id or local folder>``.

Needs the optional extra (``pip install 'segpipe[hf]'``). A folder is one ``save_pretrained`` wrote (the
model's ``config.json`` and weights, and the image processor's ``preprocessor_config.json``); a repo id is
fetched by ``huggingface_hub`` into its cache (``HF_HOME``; ``HF_HUB_OFFLINE=1`` uses the cache alone).
The metadata comes from the folder: class names from the config's ``id2label``, normalisation from the
processor, the default tile from the processor's size. Logits come out at a quarter (SegFormer) or some
other fraction of the input and are upsampled bilinearly to it.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.errors import CheckpointError
from pipeline.models.checkpoint import ModelMeta
from pipeline.palette import voc_colormap

PREFIX = "hf:"
EXTRA = "pip install 'segpipe[hf]'"
# Model types whose forward takes any input size (convolutional or overlapping-patch encoders): they get the
# "pad" policy. The others (ViT-based BEiT, DPT, ...) are fed at the processor's size ("resize").
ANY_SIZE = {"segformer", "mobilevit", "mobilevitv2", "upernet"}


def is_hf(name: str | None) -> bool:
    return bool(name) and name.startswith(PREFIX)


def installed() -> bool:
    try:
        import transformers  # noqa: F401  (a lazy module: cheap to import)
    except ImportError:
        return False
    return True


def normalize_name(name: str) -> str:
    """``hf:<ref>`` with a local folder made absolute (so every worker finds it), a repo id as written."""
    ref = name[len(PREFIX) :].strip()
    if not ref:
        raise ValueError("hf: needs a Hugging Face repo id or a local folder after it")
    folder = Path(ref).expanduser()
    return PREFIX + str(folder.resolve()) if folder.is_dir() else PREFIX + ref


class HFSegmentation(nn.Module):
    """A ``transformers`` segmentation model returning logits [N, C, H, W] at the input size."""

    def __init__(self, net: nn.Module, stride: int) -> None:
        super().__init__()
        self.net = net
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(pixel_values=x).logits
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def load_hf(name: str, sha256: str | None = None) -> tuple[nn.Module, ModelMeta, str]:
    """The model ``hf:<ref>`` names, its metadata, and the sha256 of its folder's files (pinned by ``sha256``)."""
    if not installed():
        raise CheckpointError(f"model {name}: Hugging Face models need the hf extra: {EXTRA}")
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per actor and load would clutter the job's log

    folder = _folder(name[len(PREFIX) :])
    digest = folder_sha256(folder)
    if sha256 is not None and digest != sha256.lower():
        raise CheckpointError(f"model {name}: its files have sha256 {digest}, not {sha256}")
    try:
        net = AutoModelForSemanticSegmentation.from_pretrained(folder, local_files_only=True).float().eval()
    except (OSError, ValueError, KeyError) as e:  # not a segmentation model, missing weights, unknown type
        raise CheckpointError(f"model {name}: not a transformers semantic-segmentation model: {e}") from e
    try:
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"model {name}: no image processor (preprocessor_config.json): {e}") from e
    meta = hf_meta(name, net.config, processor)
    return HFSegmentation(net, meta.stride), meta, digest


def hf_meta(name: str, config, processor) -> ModelMeta:
    """Class names from ``config.id2label``; mean and std as the processor rescales and normalises."""
    labels = {int(k): v for k, v in config.id2label.items()}
    if sorted(labels) != list(range(len(labels))):
        raise CheckpointError(f"model {name}: id2label must number its classes 0..N-1, got {sorted(labels)}")
    # The processor feeds (x * rescale - mean) / std for x in 0..255; segpipe feeds (x - 255 m) / (255 s).
    scale = 255.0 * (processor.rescale_factor if processor.do_rescale else 1.0)
    mean = processor.image_mean if processor.do_normalize else (0.0, 0.0, 0.0)
    std = processor.image_std if processor.do_normalize else (1.0, 1.0, 1.0)
    size = _processor_size(processor)
    any_size = config.model_type in ANY_SIZE
    if not any_size and size is None:
        raise CheckpointError(f"model {name}: a {config.model_type} model needs a fixed size, its processor has none")
    return ModelMeta(
        arch=name,
        class_names=tuple(labels[i] for i in range(len(labels))),
        mean=tuple(m / scale for m in mean),
        std=tuple(s / scale for s in std),
        input_policy="pad" if any_size else "resize",
        stride=math.prod(getattr(config, "strides", None) or [32]) if any_size else 1,
        size=None if any_size else size,
        palette=tuple(tuple(int(c) for c in rgb) for rgb in voc_colormap(len(labels))),
        train_crop=size if any_size else None,
    )


def folder_sha256(folder: Path) -> str:
    """One sha256 over the folder's files (names and contents, in name order; hidden files left out)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _folder(ref: str) -> Path:
    """A local folder as it is; a repo id as ``huggingface_hub`` downloads (or finds in its cache) it."""
    if Path(ref).is_dir():
        return Path(ref)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=ref))
    except Exception as e:  # no such repo, no network and nothing cached, a gated repo
        raise CheckpointError(f"model hf:{ref}: neither a local folder nor a reachable Hugging Face repo: {e}") from e


def _processor_size(processor) -> tuple[int, int] | None:
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = size or getattr(processor, "size", None)
    height, width = (getattr(size, "height", None), getattr(size, "width", None)) if size is not None else (0, 0)
    if isinstance(size, dict):
        height, width = size.get("height"), size.get("width")
    return (int(height), int(width)) if height and width else None
