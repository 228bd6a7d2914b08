"""``segpipe bench --large``: what sliding-window inference costs on images far larger than a tile.

Two questions, each answered in fresh processes so that no run inherits another's memory or warm caches:

- **Throughput.** One large procedural image through the Predictor in slide mode (crop, normalise, forward,
  softmax, gaussian-weighted band merge, argmax) against the model's forward pass alone over the same number
  of windows of the same size, in batches of the same size, on inputs already normalised on the device.
  The ratio slide / forward is what the windowing and the merge leave of the model's speed. Both run in one
  process with every core's torch threads; the rounds alternate (forward, slide, forward, ...) so that the
  machine's drifts hit both alike.
- **Memory.** The peak RSS of a process that runs a one-image job inline (plan_job + run_inline +
  finalize_job, slide mode) on PNGs of growing size, next to the same process decoding the file and nothing
  else. What grows with the pixels shows up as the decoded image (3 B/px), Pillow's decode buffer (4 B/px)
  and the mask (1 B/px); the merge itself keeps one band of windows (classes x tile height x image width),
  which grows with the width alone.
  Sampled every 0.05 s over the process tree, with two high-water marks the kernel keeps beside it as
  checks: the process's ``VmHWM`` (read by it at its end) and ``ru_maxrss`` from ``wait4``. The latter also
  counts the parent's RSS at the spawn, so the parent here imports no torch: setup runs in a child too.

Each run also records the 1-minute load average before it starts: on a shared machine a run that met
other work shows up there (and in the spread of the rounds).

``python -m pipeline.bench.large <kind> '<workload json>' [png]`` runs one measurement and prints its JSON
(``setup`` and ``png`` prepare the checkpoint and the images, also each in a process of its own).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.bench.memory import PeakTreeRSS

DEFAULT_MODEL = "lraspp_mobilenet_v3_large"  # 20 windows/s of 512x512 on this project's 2 cores; unet_tiny: 9
DEFAULT_SIZE = 4096  # the throughput image's side
MEMORY_SIDES = (5000, 10000, 20000)  # 25, 100 and 400 Mpx
SAMPLE_INTERVAL = 0.05
BLOCK = 16  # pixels per side of one colour block of the procedural images
_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@dataclass(frozen=True)
class LargeWorkload:
    checkpoint: str
    model: str
    size: int  # the throughput image is size x size
    tile: int
    overlap: float
    blend: str
    batch_size: int
    device: str
    precision: str
    threads: int  # torch threads of each measuring process: every core

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LargeWorkload:
        return cls(**json.loads(text))

    def inference(self) -> dict:
        """The job config's ``inference:`` section, as both measurements use it."""
        return {"mode": "slide", "tile": [self.tile, self.tile], "overlap": self.overlap, "blend": self.blend}


def blocky_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """HxWx3 uint8 of random-coloured BLOCK x BLOCK squares: cheap to build, and a PNG of it stays small."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (-(-height // BLOCK), -(-width // BLOCK), 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(small, np.ones((BLOCK, BLOCK, 1), np.uint8))[:height, :width])


def build_pngs(work: Path, sides: tuple[int, ...]) -> dict[int, Path]:
    """One square PNG per side, each alone in its folder (a job's input), built once; each in a process of its
    own, so that this one does not keep the pages of a 400 Mpx image after it (children would count them)."""
    pngs = {}
    for side in sides:
        path = work / "large" / f"png-{side}" / "image.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            subprocess.run([sys.executable, "-m", "pipeline.bench.large", "png", str(side), str(partial)], check=True)
            partial.rename(path)
        pngs[side] = path
    return pngs


def write_png(side: int, path: Path) -> None:
    """A side x side blocky image as a PNG, compress level 1 (fast; the blocks keep it small anyway)."""
    from PIL import Image

    Image.fromarray(blocky_image(side, side)).save(path, format="PNG", compress_level=1)


# ---- in the measuring processes ----


def setup(work: str, model: str, device: str) -> dict:
    """The checkpoint (random weights, built once), the device it resolves to, the machine and the versions:
    in a process of its own, so that the parent never imports torch and stays small (a child's
    ``ru_maxrss`` counts the parent's RSS at the spawn, and a large parent could show through)."""
    from pipeline.bench.runner import machine, versions
    from pipeline.bench.workload import NUM_CLASSES, build_checkpoint
    from pipeline.inference.predictor import resolve_device

    return {
        "checkpoint": str(build_checkpoint(Path(work), model)),
        "num_classes": NUM_CLASSES,
        "device_type": resolve_device(device).type,
        "machine": machine(),
        "versions": versions(),
    }


def _predictor(w: LargeWorkload):
    import torch

    from pipeline.config import InferenceConfig
    from pipeline.inference.plan import plan_inference
    from pipeline.inference.predictor import Predictor
    from pipeline.models.checkpoint import load_checkpoint

    torch.set_num_threads(w.threads)
    model, meta = load_checkpoint(Path(w.checkpoint).read_bytes(), w.checkpoint)
    plan = plan_inference(InferenceConfig(**w.inference()), meta)
    return Predictor(model, meta, w.device, w.batch_size, w.precision, plan=plan)


def _window_sizes(pred, height: int, width: int) -> list[tuple[int, int]]:
    return [(win.h, win.w) for row in pred.plan.windows(height, width) for win in row]


def _batches(count: int, batch_size: int) -> list[int]:
    """The batch sizes the Predictor uses for ``count`` windows of one size."""
    return [batch_size] * (count // batch_size) + ([count % batch_size] if count % batch_size else [])


def measure_slide(w: LargeWorkload) -> dict:
    """Seconds of ``Predictor.predict`` on the decoded size x size image, after a warm-up on a smaller one."""
    from pipeline.inference.predictor import Prediction

    pred = _predictor(w)
    image = blocky_image(w.size, w.size)
    warm = min(w.size, w.tile * 3 // 2)
    pred.predict([image[:warm, :warm]])
    start = time.perf_counter()
    (result,) = pred.predict([image])
    seconds = time.perf_counter() - start
    if not isinstance(result, Prediction):
        raise RuntimeError(f"slide inference failed: {result.reason}")
    return {"windows": len(_window_sizes(pred, w.size, w.size)), "seconds": seconds}


def measure_forward(w: LargeWorkload) -> dict:
    """Seconds of the model's forward alone over as many windows, in batches as large, as slide mode runs:
    a few distinct batches of windows of the image, normalised on the device before the clock, reused."""
    import torch

    pred = _predictor(w)
    image = blocky_image(w.size, w.size)
    sizes = _window_sizes(pred, w.size, w.size)
    h, wd = sizes[0]
    if any(s != (h, wd) for s in sizes):
        raise RuntimeError("the windows of a square image are of one size")
    corners = ((0, 0), (0, w.size - wd), (w.size - h, 0), (w.size - h, w.size - wd))
    tiles = [image[y : y + h, x : x + wd] for y, x in corners]
    batches = _batches(len(sizes), w.batch_size)
    inputs = {n: [pred.to_input([tiles[(k + i) % 4] for i in range(n)]) for k in range(4)] for n in set(batches)}
    with torch.inference_mode(), pred.autocast():
        for x in inputs[batches[0]]:  # warm-up: 4 passes, as slide's 4-window warm-up image at batch 1
            pred.model(x)
        _sync(pred.device)
        start = time.perf_counter()
        for i, n in enumerate(batches):
            pred.model(inputs[n][i % 4])
        _sync(pred.device)
        seconds = time.perf_counter() - start
    return {"windows": len(sizes), "seconds": seconds}


def _job_imports() -> None:
    """What the job process imports before its work: the decode-only process imports the same."""
    import torch  # noqa: F401

    import pipeline.execution  # noqa: F401
    import pipeline.job  # noqa: F401


def measure_job(w: LargeWorkload, png: Path) -> dict:
    """A one-image job inline, slide mode, max_image_pixels left at its default; outputs thrown away."""
    _job_imports()
    import torch

    from pipeline.config import load_config
    from pipeline.execution import run_inline
    from pipeline.job import finalize_job, plan_job

    torch.set_num_threads(w.threads)
    with tempfile.TemporaryDirectory(prefix="bench-large-") as out:
        start = time.perf_counter()
        cfg = load_config(
            None,
            input_uri=str(png.parent),
            output_uri=out,
            checkpoint_uri=w.checkpoint,
            batch_size=w.batch_size,
            device=w.device,
            precision=w.precision,
            inference=w.inference(),
        )
        plan = plan_job(cfg)
        infer_start = time.perf_counter()
        summaries = run_inline(plan.cfg, plan.run_id, plan.pending)
        result = finalize_job(plan, summaries, time.perf_counter() - infer_start)
        seconds = time.perf_counter() - start
    counts = result["manifest"]["counts"]
    if counts["images"] != 1 or counts["errors"]:
        raise RuntimeError(f"the one-image job did not segment its image: {counts}")
    return {"seconds": seconds, "infer_seconds": result["manifest"]["timings"]["infer_seconds"]}


def measure_decode(w: LargeWorkload, png: Path) -> dict:
    """The baseline: the job process's imports, then ``decode_rgb`` of the same file and nothing else."""
    _job_imports()
    from pipeline.images import decode_rgb, default_max_image_pixels

    start = time.perf_counter()
    image = decode_rgb(png.read_bytes(), default_max_image_pixels())
    return {"seconds": time.perf_counter() - start, "shape": list(image.shape)}


def vm_hwm_mb() -> float | None:
    """This process's peak RSS as the kernel keeps it for its address space (reset by exec, unlike
    ``ru_maxrss``). The kernel updates it lazily: pages dropped without an unmap can leave it below the peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)  # kB
    return None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


KINDS = {"slide": measure_slide, "forward": measure_forward, "job": measure_job, "decode": measure_decode}


# ---- in the parent ----


def run_child(kind: str, *args: str) -> dict:
    """One measurement in a fresh process: its result, the sampled peak RSS of its process tree, and the
    kernel's high-water RSS of the process from ``wait4`` (``ru_maxrss``), in MB."""
    argv = [sys.executable, "-m", "pipeline.bench.large", kind, *args]
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=os.environ | _ENV)
        with PeakTreeRSS(proc.pid, SAMPLE_INTERVAL) as peak:
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage, not the largest child's so far
        proc.stdout.close()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"bench --large {kind} failed (exit {proc.returncode}):\n{log.read()[-3000:]}")
    return {
        **json.loads(out.strip().splitlines()[-1]),
        "load_before": round(load, 2),
        "peak_rss_mb": round(peak.bytes / 2**20, 1),
        "ru_maxrss_mb": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
    }


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": round(statistics.median(values), 3), "max": max(values)}


def throughput(w: LargeWorkload, repeat: int, on_run=None) -> dict:
    """``repeat`` rounds of forward then slide, each in a fresh process: windows/s of each, the ratio."""
    runs: dict[str, list[dict]] = {"forward": [], "slide": []}
    for _ in range(repeat):
        for kind in runs:
            runs[kind].append(run_child(kind, w.to_json()))
            if on_run:
                on_run(kind, runs[kind][-1])
    paths = {}
    for kind, rs in runs.items():
        rates = [round(r["windows"] / r["seconds"], 3) for r in rs]
        paths[kind] = {
            "windows_per_s": spread(rates),
            "runs": rates,
            "seconds": [round(r["seconds"], 3) for r in rs],
            "load_before": [r["load_before"] for r in rs],
        }
    windows = runs["slide"][0]["windows"]
    ratio = paths["slide"]["windows_per_s"]["median"] / paths["forward"]["windows_per_s"]["median"]
    return {"image": [w.size, w.size], "windows": windows, "paths": paths, "slide_over_forward": round(ratio, 3)}


def memory(w: LargeWorkload, pngs: dict[int, Path], repeat: int, num_classes: int, on_run=None) -> dict:
    """Per image size, ``repeat`` rounds of the decode-only process and the job process; the medians, the
    spread, and what of the image's size is held whole (image, mask) or per band (the merge)."""
    runs: dict[int, dict[str, list[dict]]] = {side: {"decode": [], "job": []} for side in pngs}
    for _ in range(repeat):
        for side, png in pngs.items():
            for kind in ("decode", "job"):
                runs[side][kind].append(run_child(kind, w.to_json(), str(png)))
                if on_run:
                    on_run(f"{kind} {side}x{side}", runs[side][kind][-1])
    sizes = [_memory_row(w, side, pngs[side], runs[side], num_classes) for side in pngs]
    for key in ("peak_rss_mb", "vm_hwm_mb"):
        first = sizes[0]["job"][key]["median"]
        for row in sizes:
            row["job"][key]["ratio_to_first"] = round(row["job"][key]["median"] / first, 3)
    return {"sample_interval_s": SAMPLE_INTERVAL, "sizes": sizes}


def _memory_row(w: LargeWorkload, side: int, png: Path, runs: dict[str, list[dict]], num_classes: int) -> dict:
    pixels = side * side
    band_rows = min(w.tile, side)
    row = {
        "side": side,
        "megapixels": round(pixels / 1e6, 2),
        "file_mb": round(png.stat().st_size / 2**20, 1),
        "image_mb": round(3 * pixels / 2**20, 1),  # the decoded RGB array
        "pillow_mb": round(4 * pixels / 2**20, 1),  # Pillow's decoded image, freed after conversion
        "mask_mb": round(pixels / 2**20, 1),
        # the merge's fp32 accumulators: classes x band x width for the sum, band x width for the weight
        "band_mb": round(4 * (num_classes + 1) * band_rows * side / 2**20, 1),
    }
    for kind, rs in runs.items():
        row[kind] = {
            key: spread([round(r[key], 1 if key.endswith("_mb") else 3) for r in rs])
            for key in ("peak_rss_mb", "vm_hwm_mb", "ru_maxrss_mb", "seconds")
        } | {"load_before": [r["load_before"] for r in rs]}
    row["job_minus_decode_mb"] = round(row["job"]["peak_rss_mb"]["median"] - row["decode"]["peak_rss_mb"]["median"], 1)
    return row


def measure(
    work: Path,
    model: str = DEFAULT_MODEL,
    *,
    size: int = DEFAULT_SIZE,
    sides: tuple[int, ...] = MEMORY_SIDES,
    tile: int = 512,
    overlap: float = 0.25,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    repeat: int = 1,
    on_run=None,
) -> dict:
    """The whole report: throughput rounds first, then the memory rounds. The checkpoint and the PNGs are
    built once under ``work``; ``batch_size`` defaults to 1 on CPU (larger batches spill its caches), 16 on
    CUDA. This process imports no torch: everything that does runs in a child."""
    work.mkdir(parents=True, exist_ok=True)
    env = run_child("setup", json.dumps({"work": str(work), "model": model, "device": device}))
    batch_size = batch_size or (1 if env["device_type"] == "cpu" else 16)
    threads = len(os.sched_getaffinity(0))
    w = LargeWorkload(env["checkpoint"], model, size, tile, overlap, "gaussian", batch_size, device, precision, threads)
    report = {
        "machine": env["machine"],
        "versions": env["versions"],
        "model": model,
        "num_classes": env["num_classes"],
        "batch_size": batch_size,
        "device": device,
        "device_type": env["device_type"],
        "precision": precision,
        "torch_threads": threads,
        "rounds": repeat,
        "inference": w.inference(),
        "throughput": throughput(w, repeat, on_run),
    }
    report["memory"] = memory(w, build_pngs(work, sides), repeat, env["num_classes"], on_run)
    return report


def format_table(report: dict) -> str:
    inf, t = report["inference"], report["throughput"]
    lines = [
        f"{report['model']} ({report['num_classes']} classes), slide {inf['tile'][0]}x{inf['tile'][1]} overlap "
        f"{inf['overlap']} {inf['blend']}, batch {report['batch_size']}, {report['device_type']} "
        f"{report['precision']}, {report['torch_threads']} torch threads in one process, {report['rounds']} rounds",
        "",
        f"Throughput: one {t['image'][0]}x{t['image'][1]} image, {t['windows']} windows",
        f"{'path':<10}{'min':>9}{'median':>9}{'max':>9}  windows/s",
    ]
    for name, p in t["paths"].items():
        s = p["windows_per_s"]
        lines.append(f"{name:<10}{s['min']:>9.2f}{s['median']:>9.2f}{s['max']:>9.2f}")
    lines += [f"slide / forward (medians): {t['slide_over_forward']:.3f}", ""]
    lines.append(
        f"Memory: one-image job inline, peak RSS sampled every {report['memory']['sample_interval_s']} s (medians)"
    )
    head = ("image", "Mpx", "peak MB", "x first", "VmHWM MB", "maxrss MB", "seconds")
    lines.append(_cells((*head, "decode MB", "image MB", "mask MB", "band MB")))
    for r in report["memory"]["sizes"]:
        job = {key: r["job"][key]["median"] for key in ("peak_rss_mb", "vm_hwm_mb", "ru_maxrss_mb", "seconds")}
        lines.append(
            _cells(
                (
                    f"{r['side']}x{r['side']}",
                    f"{r['megapixels']:.0f}",
                    f"{job['peak_rss_mb']:.0f}",
                    f"{r['job']['peak_rss_mb']['ratio_to_first']:.2f}",
                    f"{job['vm_hwm_mb']:.0f}",
                    f"{job['ru_maxrss_mb']:.0f}",
                    f"{job['seconds']:.1f}",
                    f"{r['decode']['peak_rss_mb']['median']:.0f}",
                    f"{r['image_mb']:.0f}",
                    f"{r['mask_mb']:.0f}",
                    f"{r['band_mb']:.0f}",
                )
            )
        )
    return "\n".join(lines)


def _cells(cells: tuple[str, ...]) -> str:
    """The first cell left-aligned in 13 characters, the others right-aligned in 10."""
    return f"{cells[0]:<13}" + "".join(f"{c:>10}" for c in cells[1:])


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "png":
        write_png(int(sys.argv[2]), Path(sys.argv[3]))
        sys.exit()
    if kind == "setup":
        result = setup(**json.loads(sys.argv[2]))
    else:
        result = KINDS[kind](LargeWorkload.from_json(sys.argv[2]), *(Path(p) for p in sys.argv[3:]))
    print(json.dumps(result | {"vm_hwm_mb": vm_hwm_mb()}))
    sys.stdout.flush()
