"""Where the windows of an image lie: a grid of tiles with a given overlap that covers every pixel.

As mmsegmentation's ``slide_inference``: windows start every ``stride = tile * (1 - overlap)`` pixels, and the
last window of each row and column is shifted back inside the image, so the right and bottom edges are
covered too. An image smaller than the tile along an axis gets one window as large as the image there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """A ``h`` x ``w`` window whose top-left pixel is (``y``, ``x``)."""

    y: int
    x: int
    h: int
    w: int


def axis_starts(size: int, tile: int, stride: int) -> list[int]:
    """Starts of the windows of length ``tile`` along an axis of ``size`` pixels."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, stride), size - tile]


def window_rows(height: int, width: int, tile: tuple[int, int], overlap: float) -> list[list[Window]]:
    """The windows covering a ``height`` x ``width`` image, as rows of windows from top to bottom."""
    th, tw = min(tile[0], height), min(tile[1], width)
    ys = axis_starts(height, tile[0], _stride(tile[0], overlap))
    xs = axis_starts(width, tile[1], _stride(tile[1], overlap))
    return [[Window(y, x, th, tw) for x in xs] for y in ys]


def whole(height: int, width: int) -> list[list[Window]]:
    """The image as a single window."""
    return [[Window(0, 0, height, width)]]


def _stride(tile: int, overlap: float) -> int:
    return max(1, int(round(tile * (1 - overlap))))
