"""A horizontal bar chart of images/s from ``segpipe bench`` reports, drawn with Pillow (no plotting library).

``python -m pipeline.bench.plot OUT.png LABEL=REPORT.json:PATH ...`` draws one bar per argument: the
images/s of PATH (ceiling, naive, raydata, segpipe) in that report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

_W, _BAR, _GAP, _LEFT, _RIGHT = 720, 26, 10, 230, 70


def bar_chart(bars: list[tuple[str, float]], title: str) -> Image.Image:
    height = 40 + len(bars) * (_BAR + _GAP) + 10
    img = Image.new("RGB", (_W, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black")
    top = max(v for _, v in bars)
    for i, (label, value) in enumerate(bars):
        y = 40 + i * (_BAR + _GAP)
        width = int((_W - _LEFT - _RIGHT) * value / top)
        draw.text((10, y + 8), label, fill="black")
        draw.rectangle((_LEFT, y, _LEFT + width, y + _BAR), fill=(70, 110, 180))
        draw.text((_LEFT + width + 6, y + 8), f"{value:.1f}", fill="black")
    return img


def main(argv: list[str]) -> None:
    out, specs = Path(argv[0]), [s.split("=", 1) for s in argv[1:]]
    reports = [(label, *ref.rsplit(":", 1)) for label, ref in specs]
    loaded = [(label, json.loads(Path(report).read_text()), path) for label, report, path in reports]
    first = loaded[0][1]
    title = f"images/s: {first['model']}, {first['image_size']}x{first['image_size']}, {first['machine']['cpus']} CPUs"
    bar_chart([(label, r["paths"][path]["images_per_s"]) for label, r, path in loaded], title).save(out)


if __name__ == "__main__":
    main(sys.argv[1:])
