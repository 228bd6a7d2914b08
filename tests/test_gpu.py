"""CUDA only: reduced precision and channels_last keep the masks of fp32 (≥ 99.5 % of pixels). Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.inference.predictor import Predictor
from pipeline.models.checkpoint import load_checkpoint
from pipeline.synthetic import generate_sample

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _masks(checkpoint, precision: str, device: str, channels_last: bool) -> list[np.ndarray]:
    model, meta = load_checkpoint(checkpoint.read_bytes(), str(checkpoint))
    pred = Predictor(model, meta, device=device, batch_size=8, precision=precision, channels_last=channels_last)
    images = [np.asarray(generate_sample(7, i)[0]) for i in range(24)]
    return [p.mask for p in pred.predict(images)]


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_reduced_precision_masks_agree_with_fp32(checkpoint, precision):
    reference = _masks(checkpoint, "fp32", "cuda", channels_last=False)
    reduced = _masks(checkpoint, precision, "cuda", channels_last=True)
    agree = sum(int((a == b).sum()) for a, b in zip(reference, reduced, strict=True))
    total = sum(a.size for a in reference)
    print(f"{precision} + channels_last vs fp32 (IEEE): {agree / total:.5%} of {total} pixels agree")
    assert agree / total >= 0.995
    assert all(m.dtype == np.uint8 for m in reduced)


def test_cuda_fp32_matches_cpu(checkpoint):
    cpu = _masks(checkpoint, "fp32", "cpu", channels_last=False)
    gpu = _masks(checkpoint, "fp32", "cuda", channels_last=True)
    agree = sum(int((a == b).sum()) for a, b in zip(cpu, gpu, strict=True)) / sum(a.size for a in cpu)
    assert agree >= 0.9999


def test_fp32_is_ieee_and_tf32_asks_for_tensor_cores(checkpoint):
    model, meta = load_checkpoint(checkpoint.read_bytes(), str(checkpoint))
    Predictor(model, meta, device="cuda", precision="tf32")
    assert torch.backends.cudnn.conv.fp32_precision == torch.backends.cuda.matmul.fp32_precision == "tf32"
    Predictor(model, meta, device="cuda", precision="fp32")
    assert torch.backends.cudnn.conv.fp32_precision == torch.backends.cuda.matmul.fp32_precision == "ieee"
