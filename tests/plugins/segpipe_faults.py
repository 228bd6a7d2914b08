"""A tiny model family for fault-injection tests, registered as the segpipe plugin ``faults_1x1`` (entry point
in segpipe_faults-0.1.dist-info, found on sys.path: tests/conftest.py puts this folder there and in PYTHONPATH).

Only 1x1 convolutions and ReLU: each pixel's logits depend on that pixel alone, so the model is exactly
flip-equivariant and its stride is 1. A sample is "poisoned" when more than half of its pixels are pure magenta
(255, 0, 255) before ImageNet normalisation; ``on_poison`` says what a batch holding one does: "none" ignores it,
"raise" raises RuntimeError, "kill" SIGKILLs the process (a worker that really dies)."""

from __future__ import annotations

import os
import signal

import torch
from torch import nn

MEAN = (0.485, 0.456, 0.406)  # ImageNet, on the 0..1 scale: as the pipeline normalises
STD = (0.229, 0.224, 0.225)
MAGENTA = tuple((c - m) / s for c, m, s in zip((1.0, 0.0, 1.0), MEAN, STD, strict=True))  # ~(2.249, -2.036, 2.640)
TOLERANCE = 0.01  # per channel, in normalised units
ON_POISON = ("none", "raise", "kill")


def poisoned(x: torch.Tensor) -> torch.Tensor:
    """[N] bool: which samples of a normalised batch [N, 3, H, W] are more than half magenta."""
    magenta = torch.tensor(MAGENTA, device=x.device).view(1, 3, 1, 1)
    close = ((x.float() - magenta).abs() <= TOLERANCE).all(dim=1)  # [N, H, W]
    return close.flatten(1).float().mean(dim=1) > 0.5


class Faults1x1(nn.Module):
    stride = 1

    def __init__(self, num_classes: int, on_poison: str = "none", width: int = 8) -> None:
        super().__init__()
        if on_poison not in ON_POISON:
            raise ValueError(f"on_poison must be one of {ON_POISON}, got {on_poison!r}")
        self.on_poison = on_poison
        self.body = nn.Sequential(nn.Conv2d(3, width, 1), nn.ReLU(), nn.Conv2d(width, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_poison != "none" and poisoned(x).any():
            if self.on_poison == "raise":
                raise RuntimeError("poisoned input")
            os.kill(os.getpid(), signal.SIGKILL)
        return self.body(x)


def faults_1x1(num_classes: int, on_poison: str = "none") -> Faults1x1:
    return Faults1x1(num_classes, on_poison)
