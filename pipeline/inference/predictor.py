"""The model on its device: windows in batches, test-time views, and the merge into masks on the device.

Every image becomes windows (one for an image that goes through whole). Windows of one size share a batch,
whichever image they come from, and each is padded or resized by its own size alone, so a mask never depends
on what it was batched with. A batch that fails is split until the image that makes it fail is alone: that
image becomes a failure, the others are segmented as usual.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import InferenceConfig
from pipeline.cpu_tuning import flush_denormals, keep_freed_memory, route_convs_to_onednn
from pipeline.errors import DeviceError
from pipeline.inference.plan import InferencePlan, plan_inference
from pipeline.inference.stitching import MaskArray, RowSink, Stitcher
from pipeline.inference.windows import Window
from pipeline.models.checkpoint import ModelMeta

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Prediction:
    mask: np.ndarray | None  # HxW uint8 class indices at the image's original size; None: given to a WindowedImage
    mean_confidence: float  # mean over pixels of the top (merged) softmax probability


class WindowedImage(Protocol):
    """An image too large to decode whole (a huge TIFF): read window by window, its finished rows given to
    ``sink`` as they are merged, so neither the image nor its mask is ever whole in memory."""

    shape: tuple[int, int]  # height, width

    def crop(self, window: Window) -> np.ndarray:
        """The window's h x w x 3 uint8 pixels."""

    @property
    def sink(self) -> RowSink:
        """Takes the finished rows; its ``mean_confidence`` is the image's once the last row is in."""


Image = np.ndarray | WindowedImage


@dataclass(frozen=True)
class Failure:
    reason: str  # why the model could not segment this image, for its error row
    kind: str = "model"  # an ErrorKind value: "model", or "input" when a window of a windowed image was unreadable


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


_Item = tuple[int, Window]  # (image index, one of its windows)


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
        plan: InferencePlan | None = None,
    ) -> None:
        self.meta = meta
        self.plan = plan or plan_inference(InferenceConfig(), meta)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        # Reduced precision pays off on CUDA; on CPU it would only cost accuracy. channels_last pays on both:
        # 1.2-2.1x on this project's 2-core CPU (BENCHMARKS.md), and it lets cuDNN use tensor cores.
        self.autocast_dtype = _DTYPES.get(precision) if self.device.type == "cuda" else None
        if self.device.type == "cuda":
            _cuda_fp32_math(precision)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        if self.device.type == "cpu":
            keep_freed_memory()
            flush_denormals()
            route_convs_to_onednn(self.model)
        self.mean = torch.tensor(meta.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(meta.std, device=self.device).view(1, 3, 1, 1) * 255.0

    def predict(self, images: list[Image]) -> list[Prediction | Failure]:
        """Masks for HxWx3 uint8 images (or windowed ones), in input order; a Failure for an image the model
        fails on."""
        return _Run(self, images).results()

    @torch.inference_mode()
    def window_outputs(self, x: torch.Tensor, whole: list[bool]) -> list[Prediction | torch.Tensor]:
        """Per item of a normalised batch: a whole image's ``Prediction`` straight from its logits (``whole``,
        with one view), or a window's [h, w, C] probabilities for the merge (test-time views average
        probabilities, so every item is merged then)."""
        if len(self.plan.views) > 1 or not any(whole):
            return list(self.probabilities(x))
        logits = self.logits(x)
        if all(whole):
            return _predictions(logits)
        pick = torch.tensor(whole, device=logits.device)
        predictions, windows = iter(_predictions(logits[pick])), iter(_softmax(logits[~pick]))
        return [next(predictions) if w else next(windows) for w in whole]

    @torch.inference_mode()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 softmax probabilities [N, h, w, C] (classes last) of a normalised batch, averaged over the plan's
        views."""
        size = tuple(x.shape[-2:])
        total = None
        for view in self.plan.views:
            probs = _softmax(view.undo(self.logits(view.apply(x)), size))
            total = probs if total is None else total.add_(probs)
        return total if len(self.plan.views) == 1 else total.div_(len(self.plan.views))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits at the size of ``x``, whatever its input policy."""
        h, w = x.shape[-2:]
        with self.autocast():
            out = self.model(self._fit_input(x))
        if isinstance(out, dict):  # torchvision segmentation models return {"out": ...}
            out = out["out"]
        return self._fit_output(out, h, w)

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


class _Run:
    """One ``predict`` call: the windows of its images in batches, each image's stitcher, the failures."""

    def __init__(self, predictor: Predictor, images: list[Image]) -> None:
        self.p = predictor
        self.images = images
        self.rows = [predictor.plan.windows(*img.shape[:2]) for img in images]
        self.stitchers: dict[int, Stitcher] = {}  # only while an image has windows in flight
        self.out: list[Prediction | Failure | None] = [None] * len(images)

    def results(self) -> list[Prediction | Failure]:
        for items in self._buckets():
            while batch := list(islice(items, self.p.batch_size)):  # the size may shrink on CUDA OOM
                self._run(batch)
        return self.out  # type: ignore[return-value]

    def _buckets(self) -> Iterator[Iterator[_Item]]:
        """Per window size, that size's windows: image after image, row after row (so few stitchers live)."""
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, rows in enumerate(self.rows):
            by_size[rows[0][0].h, rows[0][0].w].append(i)
        for indices in by_size.values():
            yield ((i, win) for i in indices for row in self.rows[i] for win in row)

    def _run(self, batch: list[_Item]) -> None:
        """Segment and merge ``batch``; when it fails, its halves, down to the window that fails alone."""
        batch, crops = self._crops(batch)
        if not batch:
            return
        whole = [len(self.rows[i]) == len(self.rows[i][0]) == 1 and _in_memory(self.images[i]) for i, _ in batch]
        error = None
        try:
            outputs = self.p.window_outputs(self.p.to_input(crops), whole)
        except Exception as e:  # an image the model cannot take must not take its batch with it
            error = e.with_traceback(None)  # its frames would keep the failed batch's tensors alive
        if error is not None:
            self._failed(batch, error)
            return
        for (i, window), out in zip(batch, outputs, strict=True):
            if isinstance(out, Prediction):
                self.out[i] = out
            else:
                self._merge(i, window, out)

    def _crops(self, items: list[_Item]) -> tuple[list[_Item], list[np.ndarray]]:
        """The pixels of the items whose image has not failed; a windowed image whose window cannot be read (a
        corrupt block) fails, as an input, and leaves the batch."""
        kept, crops = [], []
        for i, window in items:
            if isinstance(self.out[i], Failure):  # already failed (its model batch, or an unreadable window)
                continue
            try:
                crops.append(_crop(self.images[i], window))
            except Exception as e:  # noqa: BLE001 - whatever the reader says is the row's reason
                self._fail(i, e, "cannot read this image", kind="input")
                continue
            kept.append((i, window))
        return kept, crops

    def _failed(self, batch: list[_Item], error: Exception) -> None:
        if _is_cuda_oom(error):
            torch.cuda.empty_cache()
            if len(batch) > 1 and self.p.batch_size > len(batch) // 2:
                self.p.batch_size = len(batch) // 2  # and so for the rest of this predictor's life
                log.warning("CUDA out of memory: %d windows per batch from now on", self.p.batch_size)
        if len(batch) == 1:
            self._fail(batch[0][0], error)
            return
        half = len(batch) // 2
        self._run(batch[:half])
        self._run(batch[half:])

    def _merge(self, i: int, window: Window, probs: torch.Tensor) -> None:
        try:
            if i not in self.stitchers:
                image = self.images[i]
                sink = MaskArray(*image.shape[:2]) if _in_memory(image) else image.sink
                self.stitchers[i] = Stitcher(self.rows[i], self.p.meta.num_classes, self.p.plan.blend, sink)
            stitcher = self.stitchers[i]
            stitcher.add(window, probs)
        except Exception as e:  # e.g. out of memory for one very wide image's band, or its mask's writes
            self._fail(i, e)
            return
        if stitcher.done:
            sink = self.stitchers.pop(i).sink
            self.out[i] = Prediction(getattr(sink, "mask", None), sink.mean_confidence)

    def _fail(
        self, i: int, error: Exception, what: str = "the model failed on this image", kind: str = "model"
    ) -> None:
        self.stitchers.pop(i, None)
        text = str(error).strip()
        detail = f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__
        self.out[i] = Failure(f"{what}: {detail}", kind)


def _cuda_fp32_math(precision: str) -> None:
    """How CUDA computes fp32 convolutions and matmuls in this process (one model per process). ``fp32`` means
    IEEE: PyTorch's default lets cuDNN round convolution inputs to TF32 (a 10-bit mantissa), and masks would then
    differ from the CPU's; ``tf32`` asks for the tensor cores. Under bf16/fp16 autocast only the few ops kept in
    fp32 are affected, and they stay IEEE."""
    mode = "tf32" if precision == "tf32" else "ieee"
    torch.backends.cudnn.conv.fp32_precision = mode
    torch.backends.cuda.matmul.fp32_precision = mode


def top_class(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's class and top softmax probability from [N, C, h, w] logits, in fp32. At the argmax the
    softmax is exactly 1 / sum_j exp(l_j - l_max), so no probability of the other classes is written: one max
    and one exp pass, a third less time than softmax then max on this project's CPU (BENCHMARKS.md)."""
    logits = logits.float()
    top, labels = logits.max(dim=1)
    return labels, (logits - top.unsqueeze(1)).exp_().sum(dim=1).reciprocal_()


def _predictions(logits: torch.Tensor) -> list[Prediction]:
    """Whole images' masks and mean confidences from their [N, C, h, w] logits, one copy to the host."""
    labels, top = top_class(logits)
    masks = labels.to(torch.uint8).cpu().numpy()
    confidences = (top.sum(dim=(1, 2), dtype=torch.float64) / top[0].numel()).tolist()
    return [Prediction(m, c) for m, c in zip(masks, confidences, strict=True)]


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """fp32 softmax of [N, C, h, w] logits as [N, h, w, C]: along a contiguous class axis it is 2.5-3x faster
    on CPU than over dim 1 of NCHW, and the merge adds whole pixels (all their classes) at a time."""
    nhwc = logits.float().contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    return nhwc.softmax(dim=-1)


def _in_memory(image: Image) -> bool:
    return isinstance(image, np.ndarray)


def _crop(image: Image, w: Window) -> np.ndarray:
    return image[w.y : w.y + w.h, w.x : w.x + w.w] if _in_memory(image) else image.crop(w)


def _is_cuda_oom(error: Exception) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "CUDA out of memory" in str(error)
