"""A horizontal bar chart of images/s from ``segpipe bench`` reports, drawn with matplotlib.

``python -m pipeline.bench.plot OUT.png LABEL=REPORT.json:PATH ...`` draws one bar per argument: the
images/s of PATH (ceiling, naive, raydata, segpipe) in that report."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def bar_chart(bars: list[tuple[str, float]], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 0.6 + 0.4 * len(bars)))
    labels, values = zip(*bars, strict=True)
    drawn = ax.barh(range(len(bars)), values, color="#466eb4")
    ax.bar_label(drawn, fmt="%.1f", padding=3)
    ax.set_yticks(range(len(bars)), labels)
    ax.invert_yaxis()
    ax.set_title(title, loc="left", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.savefig(out, bbox_inches="tight", dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    out, specs = Path(argv[0]), [s.split("=", 1) for s in argv[1:]]
    reports = [(label, *ref.rsplit(":", 1)) for label, ref in specs]
    loaded = [(label, json.loads(Path(report).read_text()), path) for label, report, path in reports]
    first = loaded[0][1]
    title = f"images/s: {first['model']}, {first['image_size']}x{first['image_size']}, {first['machine']['cpus']} CPUs"
    bar_chart([(label, r["paths"][path]["images_per_s"]) for label, r, path in loaded], title, out)


if __name__ == "__main__":
    main(sys.argv[1:])
