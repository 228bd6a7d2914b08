"""What a model costs: parameters, FLOPs at a given input size, and images/s on this machine."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.registry import get_model


def count_flops(model: torch.nn.Module, size: int) -> int:
    """FLOPs of one forward pass on a ``size`` x ``size`` image, as torch counts them (a multiply-add is 2)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


def images_per_second(model: torch.nn.Module, size: int, batch: int = 1, seconds: float = 5.0) -> float:
    """Forward passes on random ``size``-square images for about ``seconds`` after one warm-up pass."""
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model(x)
        done, start = 0, time.perf_counter()
        while done == 0 or time.perf_counter() - start < seconds:
            model(x)
            done += batch
    return done / (time.perf_counter() - start)


def profile(name: str, num_classes: int = 21, size: int = 512, seconds: float = 5.0) -> dict:
    model = get_model(name, num_classes=num_classes).eval()
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "gflops": round(count_flops(model, size) / 1e9, 1),
        "cpu_images_per_s": round(images_per_second(model, size, seconds=seconds), 3),
        "size": size,
        "num_classes": num_classes,
        "torch_threads": torch.get_num_threads(),
    }
