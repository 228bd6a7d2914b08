"""The table of ``deploy/gpu/check.sh``: ``python -m pipeline.bench.gpu_summary OUT`` reads the ``bench-*.json``
reports of ``segpipe bench --paths ceiling,core`` in OUT, prints one row per model and batch size (ceiling and
core images/s, their ratio, core's infer stage alone, each path's GPU peak) and writes it to ``OUT/summary.md``.
Core's images/s count the whole job (planning, model loading, reduce); its infer images/s the shards alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summarize(out: Path) -> str:
    reports = [json.loads(f.read_text()) for f in sorted(out.glob("bench-*.json"))]
    reports.sort(key=lambda r: (r["model"], r["batch_size"]))
    lines = []
    if reports:
        first = reports[0]
        gpu = first["machine"]["gpu"] or "no GPU"
        v = first["versions"]
        lines += [
            f"{gpu}, {first['machine']['cpus']} CPUs; torch {v['torch']}, torchvision {v['torchvision']}, "
            f"Python {v['python']}; {first['images']} images of {first['image_size']}x{first['image_size']}, "
            f"{first['actors']} actor, {first['device']} {first['precision']}",
            "",
        ]
    lines += [
        "| model | batch | ceiling images/s | core images/s | core / ceiling | core infer images/s "
        "| GPU peak MB ceiling | GPU peak MB core |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        ceiling, core = r["paths"].get("ceiling"), r["paths"].get("core")
        ratio = f"{core['images_per_s'] / ceiling['images_per_s']:.2f}" if ceiling and core else "-"
        infer = core and core.get("timings")
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {_figure(ceiling, 'images_per_s')} "
            f"| {_figure(core, 'images_per_s')} | {ratio} | {_figure(infer, 'images_per_second')} "
            f"| {_figure(ceiling, 'gpu_peak_mb', 0)} | {_figure(core, 'gpu_peak_mb', 0)} |"
        )
    return "\n".join(lines + _datapath(out)) + "\n"


def _datapath(out: Path) -> list[str]:
    """The data path's lines: each step alone (ms per image), the host-side steps' rates, and the one-process job."""
    found = out / "datapath-pointwise.json"
    if not found.exists():
        return []
    paths = json.loads(found.read_text())["paths"]
    lines = ["", "data path (pointwise model):"]
    if "limit" in paths:
        lines.append(
            "step ms per image alone: " + ", ".join(f"{k} {v:.2f}" for k, v in paths["limit"]["steps_ms"].items())
        )
    if "host" in paths:
        lines.append(
            "host-side steps, images/s: " + ", ".join(f"{k} {v:.0f}" for k, v in paths["host"]["rates"].items())
        )
    if "core" in paths:
        lines.append(f"the job in one process: {_figure(paths['core'], 'images_per_s')} images/s")
    return lines


def _figure(path: dict | None, key: str, digits: int = 1) -> str:
    return f"{path[key]:.{digits}f}" if path and key in path else "-"


if __name__ == "__main__":
    out = Path(sys.argv[1])
    text = summarize(out)
    (out / "summary.md").write_text(text)
    print(text, end="")
