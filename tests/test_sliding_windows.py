"""Sliding-window inference: windows cover every pixel, slide agrees with whole, batching and TTA never
change a mask, the merge holds one band of windows, and a failing image fails alone."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from test_predictor import META as UNET
from test_predictor import blocky_images as images
from torch import nn

from pipeline.config import InferenceConfig
from pipeline.inference.plan import plan_inference
from pipeline.inference.predictor import Failure, Prediction, Predictor
from pipeline.inference.stitching import MaskArray, Stitcher
from pipeline.inference.windows import window_rows
from pipeline.models import get_model
from pipeline.models.checkpoint import ModelMeta

log = logging.getLogger(__name__)

PIXELWISE = ModelMeta(arch="faults_1x1", class_names=("a", "b", "c", "d"), stride=1)


def pixelwise(on_poison: str = "raise") -> nn.Module:
    """The test plugin's 1x1-convolution model (tests/plugins): exactly flip-equivariant; raises on a window that
    is mostly pure magenta."""
    torch.manual_seed(3)
    return get_model("faults_1x1", num_classes=4, on_poison=on_poison).eval()


class OutOfMemoryAbove(nn.Module):
    """``model``, but raising CUDA's out-of-memory error on batches larger than ``limit`` (None: never)."""

    def __init__(self, model: nn.Module, limit: int | None) -> None:
        super().__init__()
        self.model, self.limit = model, limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.limit is not None and len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


def predictor(model, meta, batch_size=8, **inference) -> Predictor:
    plan = plan_inference(InferenceConfig(**inference), meta)
    return Predictor(model, meta, device="cpu", batch_size=batch_size, plan=plan)


TILE = 32


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("size", [1, TILE - 1, TILE, TILE + 1, 3 * TILE + 7])
def test_windows_cover_every_pixel_inside_the_image(size, overlap):
    for h, w in [(size, 3 * TILE + 7), (3 * TILE + 7, size), (size, size)]:
        covered = np.zeros((h, w), np.int32)
        for row in window_rows(h, w, (TILE, TILE), overlap):
            assert len({win.y for win in row}) == 1  # a row of windows shares its top edge
            for win in row:
                assert (win.h, win.w) == (min(TILE, h), min(TILE, w))
                assert 0 <= win.y and win.y + win.h <= h and 0 <= win.x and win.x + win.w <= w
                covered[win.y : win.y + win.h, win.x : win.x + win.w] += 1
        assert covered.min() >= 1


def test_slide_with_a_tile_that_covers_the_image_is_whole(tiny_unet):
    image = images([(230, 310)])[0]
    whole = predictor(tiny_unet, UNET, mode="whole").predict([image])[0]
    covering = predictor(tiny_unet, UNET, mode="slide", tile=(320, 320)).predict([image])[0]
    assert np.array_equal(whole.mask, covering.mask)
    assert whole.mean_confidence == covering.mean_confidence
    auto = predictor(tiny_unet, UNET, mode="auto", tile=(240, 320)).predict([image])[0]  # 230 pads to 240: fits
    assert np.array_equal(whole.mask, auto.mask)


@pytest.mark.parametrize("blend", ["gaussian", "mean"])
def test_slide_agrees_with_whole_on_large_procedural_images(tiny_unet, blend):
    image = images([(700, 900)], seed=5)[0]
    whole = predictor(tiny_unet, UNET, mode="whole").predict([image])[0]
    slide = predictor(tiny_unet, UNET, mode="slide", tile=(128, 128), blend=blend).predict([image])[0]
    agreement = float((whole.mask == slide.mask).mean())
    log.warning("slide (128 px tiles, %s blend) agrees with whole on %.2f%% of a 700x900 image", blend, 100 * agreement)
    assert slide.mask.shape == (700, 900)
    assert agreement > 0.9


def test_batching_windows_of_several_images_never_changes_a_mask(tiny_unet):
    batch = images([(100, 130), (64, 64), (20, 300), (100, 130), (33, 47)], seed=1)
    alone = [predictor(tiny_unet, UNET, batch_size=1, mode="slide", tile=(48, 48)).predict([img])[0] for img in batch]
    for size in (3, 8, 64):
        together = predictor(tiny_unet, UNET, batch_size=size, mode="slide", tile=(48, 48)).predict(batch)
        for a, b in zip(alone, together, strict=True):
            assert np.array_equal(a.mask, b.mask)
            assert a.mean_confidence == pytest.approx(b.mean_confidence, abs=1e-6)


def test_a_horizontal_flip_of_a_flip_equivariant_model_changes_nothing():
    model = pixelwise()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    batch = images([(45, 70), (90, 30)], seed=2)
    plain = predictor(model, PIXELWISE, mode="slide", tile=(32, 32)).predict(batch)
    flipped = predictor(model, PIXELWISE, mode="slide", tile=(32, 32), tta={"flips": ["horizontal"]}).predict(batch)
    both = predictor(model, PIXELWISE, mode="whole", tta={"flips": ["horizontal", "vertical", "both"]}).predict(batch)
    for a, b, c in zip(plain, flipped, both, strict=True):
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.mask, c.mask)
    assert len(calls) > 3 * len(batch)  # the views did run


def test_scales_merge_at_the_original_size(tiny_unet):
    batch = images([(100, 130), (64, 64)], seed=4)
    plain = predictor(tiny_unet, UNET, mode="slide", tile=(64, 64)).predict(batch)
    one = predictor(tiny_unet, UNET, mode="slide", tile=(64, 64), tta={"scales": [1.0]}).predict(batch)
    scaled = predictor(tiny_unet, UNET, mode="slide", tile=(64, 64), tta={"scales": [0.75, 1.0, 1.25]}).predict(batch)
    for p, o, s, img in zip(plain, one, scaled, batch, strict=True):
        assert np.array_equal(p.mask, o.mask)
        assert s.mask.shape == img.shape[:2]
        assert 0.5 < float((s.mask == p.mask).mean()) < 1.0  # a different, averaged, answer at the same size


def test_the_merge_holds_one_band_of_windows_not_the_image():
    rows = window_rows(1000, 300, (64, 64), 0.25)
    stitcher = Stitcher(rows, num_classes=4, blend="gaussian", sink=MaskArray(1000, 300))
    bands = set()
    for row in rows:
        for win in row:
            stitcher.add(win, torch.rand(win.h, win.w, 4))
            if stitcher._sum is not None:
                bands.add(tuple(stitcher._sum.shape))
    assert bands == {(64, 300, 4)}
    assert stitcher.done and stitcher._sum is None
    assert stitcher.sink.mask.shape == (1000, 300) and stitcher.sink.mask.max() < 4


def test_an_image_the_model_raises_on_fails_alone():
    model = pixelwise()
    batch = images([(40, 50), (40, 50), (40, 50), (70, 20)], seed=6)
    batch[1][:] = (255, 0, 255)
    preds = predictor(model, PIXELWISE, batch_size=8, mode="slide", tile=(32, 32)).predict(batch)
    assert isinstance(preds[1], Failure) and "RuntimeError: poisoned input" in preds[1].reason
    for i in (0, 2, 3):
        alone = predictor(model, PIXELWISE, batch_size=1, mode="slide", tile=(32, 32)).predict([batch[i]])[0]
        assert isinstance(preds[i], Prediction) and np.array_equal(preds[i].mask, alone.mask)


def test_cuda_out_of_memory_halves_the_windows_per_batch():
    # A CUDA out-of-memory error cannot be caused on a machine without CUDA: the model raises torch's own.
    model = OutOfMemoryAbove(pixelwise(), limit=2)
    batch = images([(64, 64), (64, 64)], seed=7)
    p = predictor(model, PIXELWISE, batch_size=8, mode="slide", tile=(32, 32))
    preds = p.predict(batch)
    assert p.batch_size == 2 and all(isinstance(x, Prediction) for x in preds)
    model.limit = None
    reference = predictor(model, PIXELWISE, batch_size=1, mode="slide", tile=(32, 32)).predict(batch)
    for a, b in zip(preds, reference, strict=True):
        assert np.array_equal(a.mask, b.mask)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.75])
def test_the_band_merge_equals_a_merge_over_the_whole_image(overlap, monkeypatch):
    from pipeline.inference import stitching

    monkeypatch.setattr(stitching, "FINISH_PIXELS", 500)  # several finishing steps per band
    rows = window_rows(150, 170, (40, 40), overlap)
    generator = torch.Generator().manual_seed(0)
    stitcher = Stitcher(rows, num_classes=4, blend="gaussian", sink=stitching.MaskArray(150, 170))
    total, weight = torch.zeros(150, 170, 4), torch.zeros(150, 170)
    for win in (w for row in rows for w in row):
        probs = torch.rand(win.h, win.w, 4, generator=generator)
        stitcher.add(win, probs)
        importance = stitching._importance(win.h, win.w, "gaussian", torch.device("cpu"))
        total[win.y : win.y + win.h, win.x : win.x + win.w].addcmul_(probs, importance[..., None])
        weight[win.y : win.y + win.h, win.x : win.x + win.w] += importance
    top, labels = (total / weight[..., None]).max(dim=-1)
    assert np.array_equal(stitcher.sink.mask, labels.numpy())
    assert stitcher.sink.mean_confidence == pytest.approx(float(top.double().mean()), rel=1e-9)
