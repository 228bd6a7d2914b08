"""Predictor: masks at the original size, batching invariance, and the resize input policy."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.inference.predictor import Prediction, Predictor
from pipeline.models.checkpoint import ModelMeta

META = ModelMeta(arch="unet_tiny", class_names=("a", "b", "c"), stride=16)


def blocky_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        # smooth-ish content so predictions vary over the image
        base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
        out.append(np.ascontiguousarray(np.kron(base, np.ones((4, 4, 1), np.uint8))[:h, :w]))
    return out


def _agree(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((a == b).mean())


def _check(preds, images, num_classes=3):
    assert len(preds) == len(images)
    for p, img in zip(preds, images, strict=True):
        assert isinstance(p, Prediction)
        assert p.mask.shape == img.shape[:2]
        assert p.mask.dtype == np.uint8
        assert int(p.mask.max()) < num_classes
        assert 1 / num_classes < p.mean_confidence <= 1.0


def test_mixed_sizes(tiny_unet):
    images = blocky_images([(50, 70), (64, 64), (50, 70)])
    preds = Predictor(tiny_unet, META, device="cpu", batch_size=8).predict(images)
    _check(preds, images)
    # a random network still predicts more than one class somewhere
    assert len(np.unique(np.concatenate([p.mask.ravel() for p in preds]))) > 1
    # output order follows input order: each equals the prediction of that image alone
    single = Predictor(tiny_unet, META, device="cpu", batch_size=1)
    for img, p in zip(images, preds, strict=True):
        alone = single.predict([img])[0]
        assert _agree(alone.mask, p.mask) >= 0.9999
        assert alone.mean_confidence == pytest.approx(p.mean_confidence, abs=1e-4)


def test_batching_invariance(tiny_unet):
    images = blocky_images([(50, 70), (64, 64), (50, 70), (50, 70), (33, 47), (64, 64), (50, 70)], seed=1)
    a = Predictor(tiny_unet, META, device="cpu", batch_size=1).predict(images)
    b = Predictor(tiny_unet, META, device="cpu", batch_size=8).predict(images)
    _check(a, images)
    _check(b, images)
    equal = sum(int((x.mask == y.mask).sum()) for x, y in zip(a, b, strict=True))
    total = sum(x.mask.size for x in a)
    assert equal / total >= 0.9999
    for x, y in zip(a, b, strict=True):
        assert x.mean_confidence == pytest.approx(y.mean_confidence, abs=1e-4)


def test_result_does_not_depend_on_neighbours(tiny_unet):
    target = blocky_images([(50, 70)], seed=2)[0]
    others = blocky_images([(50, 70), (50, 70), (64, 64), (31, 31)], seed=3)
    pred = Predictor(tiny_unet, META, device="cpu", batch_size=4)
    alone = pred.predict([target])[0]
    lists = [
        [others[0], target],
        [target] + others,
        [others[2], others[0], others[1], target, others[3]],
        others + [target, others[1]],
    ]
    for images in lists:
        k = next(n for n, i in enumerate(images) if i is target)
        got = pred.predict(images)[k]
        assert _agree(got.mask, alone.mask) >= 0.9999
        assert got.mean_confidence == pytest.approx(alone.mean_confidence, abs=1e-4)
    # a different image gets a different mask, so the check is not vacuous
    assert _agree(pred.predict([others[0]])[0].mask, alone.mask) < 0.99


def test_resize_policy(tiny_unet):
    meta = ModelMeta(arch="unet_tiny", class_names=("a", "b", "c"), input_policy="resize", size=(32, 32))
    images = blocky_images([(50, 70), (64, 64), (17, 90)], seed=4)
    preds = Predictor(tiny_unet, meta, device="cpu", batch_size=2).predict(images)
    _check(preds, images)


def test_empty_list(tiny_unet):
    assert Predictor(tiny_unet, META, device="cpu").predict([]) == []


def test_whole_images_are_classed_straight_from_their_logits(tiny_unet):
    """Class and top probability as softmax-then-max gives them, without writing every class's probability."""
    import torch

    from pipeline.inference.predictor import top_class

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 9, 11) * 6
    for given in (logits, logits.bfloat16()):
        labels, top = top_class(given)
        probs = given.float().softmax(1)
        assert top.dtype == torch.float32
        assert torch.equal(labels, probs.argmax(1))
        torch.testing.assert_close(top, probs.amax(1))

    image = blocky_images([(64, 64)], seed=5)[0]
    pred = Predictor(tiny_unet, META, device="cpu", batch_size=1)
    got = pred.predict([image])[0]
    with torch.inference_mode():
        reference = pred.logits(pred.to_input([image])).softmax(1)
    assert np.array_equal(got.mask, reference.argmax(1)[0].numpy())
    assert got.mean_confidence == pytest.approx(float(reference.amax(1).mean()), rel=1e-6)
