"""The model on its device: preprocessing, size-bucketed batches, argmax and confidence on the device.

Only images of the same size share a batch, and every image is padded or resized
by its own size alone, so a mask never depends on which images it was batched with.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.cpu_tuning import keep_freed_memory, route_convs_to_onednn
from pipeline.errors import DeviceError
from pipeline.models.checkpoint import ModelMeta

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Prediction:
    mask: np.ndarray  # HxW uint8 class indices at the image's original size
    mean_confidence: float  # mean over pixels of the max softmax probability


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first GPU if CUDA has one, else the CPU; DeviceError for a GPU this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise DeviceError(f"device: {name} was asked for, but this machine has {count} CUDA devices")
    return device


class Predictor:
    """Holds one model resident on its device and turns RGB arrays into masks."""

    def __init__(
        self,
        model: nn.Module,
        meta: ModelMeta,
        device: str = "auto",
        batch_size: int = 8,
        precision: str = "fp32",
        channels_last: bool = True,
    ) -> None:
        self.meta = meta
        self.device = resolve_device(device)
        self.batch_size = batch_size
        # Reduced precision pays off on CUDA; on CPU it would only cost accuracy. channels_last pays on both:
        # 1.2-2.1x on this project's 2-core CPU (BENCHMARKS.md), and it lets cuDNN use tensor cores.
        self.autocast_dtype = _DTYPES.get(precision) if self.device.type == "cuda" else None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        if self.device.type == "cpu":
            keep_freed_memory()
            route_convs_to_onednn(self.model)
        self.mean = torch.tensor(meta.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(meta.std, device=self.device).view(1, 3, 1, 1) * 255.0

    def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """Masks for HxWx3 uint8 images, in input order."""
        out: list[Prediction | None] = [None] * len(images)
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            buckets[img.shape[:2]].append(i)
        for idx in buckets.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                for i, pred in zip(chunk, self._forward_same_size([images[i] for i in chunk]), strict=True):
                    out[i] = pred
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _forward_same_size(self, images: list[np.ndarray]) -> list[Prediction]:
        h, w = images[0].shape[:2]
        x = self._fit_input(self.to_input(images))
        with self.autocast():
            logits = self.model(x)
        if isinstance(logits, dict):  # torchvision segmentation models return {"out": ...}
            logits = logits["out"]
        logits = self._fit_output(logits.float(), h, w)
        top, labels = logits.max(dim=1)
        # Top softmax probability = 1 / sum_c exp(l_c - top): one exp pass, a third cheaper than logsumexp.
        conf = (logits - top.unsqueeze(1)).exp_().sum(dim=1).reciprocal_().mean(dim=(1, 2))
        masks = labels.to(torch.uint8).cpu().numpy()
        confs = conf.cpu().numpy()
        return [Prediction(m, float(c)) for m, c in zip(masks, confs, strict=True)]

    def to_input(self, images: list[np.ndarray]) -> torch.Tensor:
        """Same-size HxWx3 uint8 images as one normalised float batch on the device, in the model's layout."""
        batch = torch.from_numpy(np.stack(images))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        # NHWC uint8 viewed as NCHW is already channels_last; normalise in place rather than in new tensors.
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return x.sub_(self.mean).div_(self.std).contiguous(memory_format=self.memory_format)

    def autocast(self):
        """Reduced-precision autocast on CUDA when asked for; nothing otherwise."""
        if self.autocast_dtype:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def _fit_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.meta.input_policy == "resize":
            return F.interpolate(x, size=tuple(self.meta.size), mode="bilinear", align_corners=False)
        s = self.meta.stride
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % s, (-w) % s
        return F.pad(x, (0, pad_w, 0, pad_h)) if (pad_h or pad_w) else x

    def _fit_output(self, logits: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if self.meta.input_policy == "resize":
            return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits[..., :h, :w]
