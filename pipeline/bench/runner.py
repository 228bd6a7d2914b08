"""Run the benchmark's paths one after another, each in its own process; figures, ratios and the machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.bench.memory import PeakTreeRSS
from pipeline.bench.workload import Workload

ORDER = ("ceiling", "naive", "raydata", "segpipe")


def run_path(name: str, workload: Workload) -> dict:
    """One path in a fresh Python process: images/s, seconds, and the peak RSS of its whole process tree (and
    whatever else the path reports: ``timings``, ``gpu_peak_mb``, ``steps_ms``...)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.bench.paths", name, workload.to_json()],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        )
        with PeakTreeRSS(proc.pid) as peak:
            out, _ = proc.communicate()
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"bench path {name} failed (exit {proc.returncode}):\n{log.read()[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {
        "images": result["images"],
        "seconds": round(result["seconds"], 3),
        "images_per_s": round(result["images"] / result["seconds"], 3),
        "peak_rss_mb": round(peak.bytes / 2**20, 1),
        **{key: value for key, value in result.items() if key not in ("images", "seconds")},
    }


def run_bench(workload: Workload, paths: tuple[str, ...] = ORDER, on_path=None, repeat: int = 1) -> dict:
    """``repeat`` rounds of every path in turn. Each path reports its fastest round, the one least slowed by
    whatever else shares the machine (timeit's rule), and with more than one round ``runs`` lists the
    images/s of every round, so that the spread stays visible."""
    rounds: dict[str, list[dict]] = {name: [] for name in paths}
    for _ in range(repeat):
        for name in paths:
            rounds[name].append(run_path(name, workload))
            if on_path:
                on_path(name, rounds[name][-1])
    results = {name: _fastest(runs) for name, runs in rounds.items()}
    ratios = {
        f"segpipe_over_{other}": round(results["segpipe"]["images_per_s"] / results[other]["images_per_s"], 3)
        for other in ("ceiling", "naive", "raydata")
        if "segpipe" in results and other in results
    }
    return {
        "machine": machine(),
        "model": workload.model,
        "image_size": workload.size,
        "images": workload.count,
        "batch_size": workload.batch_size,
        "actors": workload.actors,
        "device": workload.device,
        "precision": workload.precision,
        "rounds": repeat,
        "versions": versions(),
        "paths": results,
        "ratios": ratios,
    }


def _fastest(runs: list[dict]) -> dict:
    best = dict(max(runs, key=lambda r: r["images_per_s"]))
    if len(runs) > 1:
        best["runs"] = [r["images_per_s"] for r in runs]
    return best


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "gpu": None,
    }
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    import pyarrow
    import torch
    import torchvision

    from pipeline import __version__

    return {
        "segpipe": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": _installed("ray"),  # None where Ray is not installed (the core paths run without it)
        "pyarrow": pyarrow.__version__,
    }


def _installed(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def format_table(report: dict) -> str:
    gpu = any("gpu_peak_mb" in r for r in report["paths"].values())
    lines = [
        f"{report['model']}, {report['images']} images of {report['image_size']}x{report['image_size']}, "
        f"batch {report['batch_size']}, {report['actors']} actors, {report['device']} {report['precision']}",
        f"{'path':<10}{'images/s':>10}{'seconds':>10}{'peak RSS MB':>13}" + (f"{'GPU peak MB':>13}" if gpu else ""),
    ]
    for name, r in report["paths"].items():
        line = f"{name:<10}{r['images_per_s']:>10.2f}{r['seconds']:>10.1f}{r['peak_rss_mb']:>13.0f}"
        if gpu:  # the paths that used CUDA in their own process: ceiling and core
            line += f"{r['gpu_peak_mb']:>13.0f}" if "gpu_peak_mb" in r else f"{'-':>13}"
        lines.append(line)
    lines += [f"{k}: {v:.2f}" for k, v in report["ratios"].items()]
    return "\n".join(lines)
