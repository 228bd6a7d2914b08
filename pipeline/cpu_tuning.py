"""Three defaults that can cost a CPU forward pass a third or more of its time, and their fixes.

The first two were found profiling ``lraspp_mobilenet_v3_large`` at 512x512 in an actor with one torch thread
(BENCHMARKS.md has the figures):

- **Page faults.** glibc hands every allocation over its dynamic mmap threshold to the kernel and gives
  it back on free, so each forward pass faults its 20-50 MB of fresh activations and logits in again,
  page by page: ~10,000-23,000 minor faults per image. Keeping freed memory in the heap removes them.
- **1x1 convolutions off oneDNN.** PyTorch sends an unstrided 1x1 convolution with a batch under 16 to its
  own GEMM path when it runs on one thread ("THNN is faster when single-threaded", ATen's ``use_mkldnn``).
  For channels_last inputs that path is the slower one.
- **Denormal numbers.** Floats below 2^-126 take a slow path in x86 arithmetic. Values that decay into that
  range (random initialisations can) make a forward pass's speed depend on the weights; two random
  initialisations of one model once ran at 17.9 and 30 images/s. Flushing them to zero changes no mask.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch
from torch import nn

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, looked up once (find_library may run ldconfig)."""
    return ctypes.CDLL(ctypes.util.find_library("c"))


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to serve large allocations from its heap and to keep freed memory for reuse, once per
    process. The process's resident size then stays at its peak instead of breathing with every image,
    which is what a long-lived model process wants. False where the C library is not glibc."""
    libc = _libc()
    if not hasattr(libc, "mallopt"):
        return False
    big = 1 << 30
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, big) and libc.mallopt(_M_TRIM_THRESHOLD, big))


def flush_denormals() -> bool:
    """Treat denormal floats as zero in this process's CPU arithmetic (SSE3's DAZ/FTZ; False where the CPU
    lacks them)."""
    return torch.set_flush_denormal(True)


def release_freed_memory() -> None:
    """Give the heap's free memory back to the kernel now (glibc's malloc_trim, every arena). With freed memory
    kept, a very large image's decode buffers would stay resident in its IO thread's arena, which the model's
    thread does not allocate from, while the windows go through the model. A no-op outside glibc."""
    libc = _libc()
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class OneDNNConv2d(nn.Conv2d):
    """A Conv2d whose CPU float32 inference is always oneDNN's; same parameters, same state_dict keys. With
    gradients on (a model trained after a validation pass) it is a plain Conv2d."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.padding_mode == "zeros"
            and not torch.is_grad_enabled()
        ):
            return torch.ops.aten.mkldnn_convolution(
                x, weight, bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super()._conv_forward(x, weight, bias)


def route_convs_to_onednn(model: nn.Module) -> int:
    """Switch, in place, every plain Conv2d with numeric padding to ``OneDNNConv2d``; returns how many.
    Subclasses are left alone (their forward may differ), and so is ``padding="same"``, which oneDNN's op
    does not take."""
    if not torch.backends.mkldnn.is_available():
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Conv2d and not isinstance(module.padding, str):
            module.__class__ = OneDNNConv2d
            swapped += 1
    return swapped
