"""The data path against its own limit: the real job with a model that costs almost nothing (``pointwise``, one
1x1 convolution), its input and output on the local S3 server, beside what its unavoidable steps cost alone.

- ``limit``: one image at a time through each step, one thread, nothing else running, the step timed alone:
  fetch (a GET from the S3 server), JPEG decode, normalise, the model, argmax and confidence, palette-PNG
  encode, statistics (class counts and the row), and the writes (the mask's PUT, and the shard's stats part
  shared among its images). 1 / their sum is what one core could do if nothing else were paid.
- ``host``: the steps that stay on the CPU when the model, argmax and confidence run on a GPU (fetch, decode,
  encode, statistics, writes), over the same images in 1 thread, in one thread per core of one process, and
  in one process per core. Threads that fall short of processes are held back by the GIL.
- the job itself is the ``segpipe`` path of the main bench, run on this workload.

``python -m pipeline.bench.paths limit|host '<workload json>'`` runs one (``paths`` lists them).
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline import storage
from pipeline.bench.workload import Workload

STEPS = ("fetch", "decode", "normalise", "model", "argmax_confidence", "png_encode", "statistics", "writes")
HOST_STEPS = ("fetch", "decode", "png_encode", "statistics", "writes")
PATHS = ("limit", "host", "segpipe")  # run for each storage client
SAMPLE = 256  # images timed per step: enough for a stable mean, few enough to be quick


def measure(
    work: Path,
    size: int = 512,
    count: int = 1024,
    actors: int = 2,
    repeat: int = 1,
    on_path=None,
    device: str = "cpu",
    clients: tuple[str, ...] = ("s3fs",),
) -> dict:
    """``repeat`` interleaved rounds of limit, host and the real job (the ``segpipe`` path) on the ``pointwise``
    model, the images on a local S3 server started here and reached through each of ``clients`` in turn
    (``storage.client``; the paths of a client other than s3fs are named ``<path>:<client>``); the per-core
    summary of each client in ``datapath``."""
    from pipeline.bench.runner import run_bench
    from pipeline.bench.workload import build
    from pipeline.devtools.local_s3 import LocalS3

    w = build(work, "pointwise", size, count, batch_size=1, actors=actors, device=device, precision="fp32")
    with LocalS3(work / "s3-datapath") as s3:
        w = replace(w, images=upload(s3, Path(w.images)), storage=s3.storage_config())
        report = run_bench(w, tuple(_named(p, c) for c in clients for p in PATHS), on_path, repeat)
    report["datapath"] = {client: summarise(report, client) for client in clients}
    return report


def _named(path: str, client: str) -> str:
    return path if client == "s3fs" else f"{path}:{client}"


def upload(s3, images: Path, bucket: str = "bench") -> str:
    """The workload's JPEGs on the S3 server (once); returns their prefix's URI."""
    fs = s3.fs()
    prefix = f"{bucket}/{images.name}"
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    files = sorted(images.glob("*.jpg"))
    if len(fs.ls(prefix) if fs.exists(prefix) else []) != len(files):
        fs.pipe({f"{prefix}/{f.name}": f.read_bytes() for f in files})
    return f"s3://{prefix}"


class _Steps:
    """Everything the steps need, made before any clock starts: the storage, the model (``predictor``), the output
    prefix, and open connections."""

    def __init__(self, w: Workload, classes: tuple[int, np.ndarray] | None = None) -> None:
        """With ``classes`` (the number of classes and the palette) no model is loaded, and torch not imported."""
        from pipeline.config import JobConfig

        cfg = JobConfig(input_uri=w.images, output_uri=w.images, checkpoint_uri=w.checkpoint, storage=w.storage or {})
        self.fs, root = cfg.resolve(w.images)
        self.paths = sorted(self.fs.ls(root))[:SAMPLE]
        bucket = storage.bucket_of(self.fs, root)
        self.out = f"{bucket}/bench-steps/{os.getpid()}" if bucket else tempfile.mkdtemp(prefix="bench-steps-")
        if classes is None:
            self._load_model(w)
        else:
            self.num_classes, self.palette = classes
        self.shard_size, self.png_level = cfg.shard_size, cfg.png_compress_level
        storage.write_bytes(self.fs, f"{self.out}/warm-up", self.fetch(self.paths[0]))  # connections open

    def _load_model(self, w: Workload) -> None:
        import torch

        from pipeline.inference.predictor import Predictor
        from pipeline.models.checkpoint import load_checkpoint

        torch.set_num_threads(1)
        model, meta = load_checkpoint(Path(w.checkpoint).read_bytes(), w.checkpoint)
        self.predictor = Predictor(model, meta, device=w.device, batch_size=1, precision=w.precision)
        self.num_classes, self.palette = meta.num_classes, meta.palette_array()

    def fetch(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def mask(self, data: bytes) -> tuple[np.ndarray, float]:
        """The model's mask of one image, untimed (``host`` starts from masks)."""
        from pipeline.images import decode_rgb

        (prediction,) = self.predictor.predict([decode_rgb(data)])
        return prediction.mask, prediction.mean_confidence

    def row(self, i: int, mask: np.ndarray, confidence: float):
        from pipeline.outputs import ImageRow
        from pipeline.stats import image_stats

        ids = dict(run_id="bench", image_id=f"{i}.jpg", source_uri=self.paths[i], shard_id="bench", model="pointwise")
        stats = image_stats(mask, self.num_classes, None).columns()
        h, w = mask.shape
        return ImageRow(
            **ids,
            **stats,
            width=w,
            height=h,
            mask_uri=f"{self.out}/masks/{i}.png",
            mean_confidence=confidence,
            label_uri=None,
            error=None,
            error_kind=None,
            increment=1,
            crs=None,
            bounds=None,
        )

    def write_mask(self, i: int, png: bytes) -> None:
        storage.write_bytes(self.fs, f"{self.out}/masks/{i}.png", png)

    def write_part(self, rows: list) -> None:
        from pipeline.outputs import write_stats

        path = f"{self.out}/stats/part-{len(rows)}-{time.monotonic_ns()}.parquet"
        write_stats(self.fs, path, rows, "bench", {}, self.num_classes)


def limit(w: Workload) -> tuple[int, float, dict]:
    """Each step's milliseconds per image, one image at a time, one thread; ``seconds`` is their sum."""
    import torch

    from pipeline.images import decode_rgb
    from pipeline.palette import mask_to_png

    s = _Steps(w)
    spent, cpu = dict.fromkeys(STEPS, 0.0), dict.fromkeys(STEPS, 0.0)
    rows: list = []

    def timed(step: str, fn: Callable, *args):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        spent[step] += time.perf_counter() - start
        cpu[step] += time.process_time() - start_cpu
        return out

    def one(i: int, path: str) -> None:
        data = timed("fetch", s.fetch, path)
        image = timed("decode", decode_rgb, data)
        x = timed("normalise", s.predictor.to_input, [image])
        logits = timed("model", s.predictor.logits, x)
        mask, top = timed("argmax_confidence", _classes, logits)
        png = timed("png_encode", mask_to_png, mask, s.palette, s.png_level)
        rows.append(timed("statistics", s.row, i, mask, top))
        timed("writes", s.write_mask, i, png)
        if len(rows) == s.shard_size or i == len(s.paths) - 1:
            timed("writes", s.write_part, rows)
            rows.clear()

    with torch.inference_mode():
        one(0, s.paths[0])  # untimed: imports, the first forward's allocations, the first writes
        s.write_part(rows)
        rows.clear()
        for totals in (spent, cpu):
            totals.update(dict.fromkeys(STEPS, 0.0))
        for i, path in enumerate(s.paths):
            one(i, path)
    n = len(s.paths)
    # wall time, and the CPU time of the whole process (s3fs does its IO in a thread of its own)
    per_image = {"steps_ms": spent, "steps_cpu_ms": cpu}
    return n, sum(spent.values()), {k: _ms_per_image(totals, n) for k, totals in per_image.items()}


def _ms_per_image(seconds: dict[str, float], n: int) -> dict[str, float]:
    return {step: round(1000 * v / n, 3) for step, v in seconds.items()}


def _classes(logits) -> tuple[np.ndarray, float]:
    import torch

    from pipeline.inference.predictor import top_class

    labels, top = top_class(logits)
    return labels[0].to(torch.uint8).cpu().numpy(), float(top.mean(dtype=torch.float64))


def host(w: Workload) -> tuple[int, float, dict]:
    """Images/s of the host-side steps in 1 thread, in one thread per core, and in one process per core."""
    cpus = len(os.sched_getaffinity(0))
    s = _Steps(w)
    masks = [s.mask(s.fetch(p)) for p in s.paths]  # untimed: on a GPU node these come from the device
    _host_steps(s, [0], masks)  # imports (pyarrow, PIL's plugins) and first writes before any clock
    one = _rate(lambda: _host_steps(s, range(len(masks)), masks))
    with ThreadPoolExecutor(cpus) as pool:
        threads = _rate(lambda: list(pool.map(lambda part: _host_steps(s, part, masks), _parts(len(masks), cpus))))
    spawn = multiprocessing.get_context("spawn")  # a fork would copy torch's threads
    ready = spawn.Barrier(cpus)  # no task ends before every worker is set up: all of them are, before the clock
    setup = (w, (s.num_classes, s.palette), masks, ready)
    with ProcessPoolExecutor(cpus, mp_context=spawn, initializer=_init_worker, initargs=setup) as pool:
        list(pool.map(_noop, range(cpus)))
        processes = _rate(lambda: list(pool.map(_worker_steps, _parts(len(masks), cpus))))
    n = len(masks)
    rates = {"one_thread": n / one, f"{cpus}_threads": n / threads, f"{cpus}_processes": n / processes}
    return n, threads, {"cpus": cpus, "rates": {k: round(v, 2) for k, v in rates.items()}}


def _host_steps(s: _Steps, indices, masks: list) -> None:
    from pipeline.images import decode_rgb
    from pipeline.palette import mask_to_png

    rows = []
    for i in indices:
        decode_rgb(s.fetch(s.paths[i]))
        mask, confidence = masks[i]
        png = mask_to_png(mask, s.palette, s.png_level)
        rows.append(s.row(i, mask, confidence))
        s.write_mask(i, png)
        if len(rows) == s.shard_size:
            s.write_part(rows)
            rows = []
    if rows:
        s.write_part(rows)


def _parts(n: int, k: int) -> list[range]:
    return [range(i, n, k) for i in range(k)]


def _rate(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


_worker: tuple[_Steps, list] | None = None


def _init_worker(w: Workload, classes: tuple[int, np.ndarray], masks: list, ready) -> None:
    global _worker
    _worker = (_Steps(w, classes), masks)
    _host_steps(_worker[0], [0], masks)  # as in the parent: imports and first writes before the clock
    ready.wait()


def _noop(_: int) -> None:
    return None


def _worker_steps(part: range) -> None:
    _host_steps(_worker[0], part, _worker[1])


def summarise(report: dict, client: str = "s3fs") -> dict:
    """Per core: the job, its limit, their ratio; the host-side share, by wall time and by CPU time (a GET's
    wait for the server costs no core), and how far threads scale on it against processes."""
    paths = {name: report["paths"][_named(name, client)] for name in PATHS}
    cpus = report["machine"]["cpus"]
    limit = paths["limit"]
    limit_per_core = 1000 / sum(limit["steps_ms"].values())
    job_per_core = paths["segpipe"]["images_per_s"] / cpus
    host_ms = sum(limit["steps_ms"][k] for k in HOST_STEPS)
    host_cpu_ms = sum(limit["steps_cpu_ms"][k] for k in HOST_STEPS)
    rates = paths["host"]["rates"]
    threads, processes = rates[f"{cpus}_threads"], rates[f"{cpus}_processes"]
    return {
        "limit_images_per_s_per_core": round(limit_per_core, 2),
        "job_images_per_s_per_core": round(job_per_core, 2),
        "job_over_limit": round(job_per_core / limit_per_core, 3),
        "host_ms_per_image": round(host_ms, 3),
        "host_images_per_s_per_core": round(1000 / host_ms, 2),
        "host_cpu_ms_per_image": round(host_cpu_ms, 3),
        "host_images_per_cpu_second": round(1000 / host_cpu_ms, 2),
        "host_threads_over_processes": round(threads / processes, 3),
        # Amdahl: the share of the host work that runs one thread at a time, from the threads' speed-up
        "host_serial_share": round(_serial_share(threads / rates["one_thread"], cpus), 3),
    }


def _serial_share(speedup: float, n: int) -> float:
    return max(0.0, min(1.0, (n / speedup - 1) / (n - 1))) if n > 1 else 1.0


def format_summary(report: dict) -> str:
    return "\n".join(_format(report, client, s) for client, s in report["datapath"].items())


def _format(report: dict, client: str, s: dict) -> str:
    limit = report["paths"][_named("limit", client)]
    wall, cpu = limit["steps_ms"], limit["steps_cpu_ms"]
    return (
        f"{client}: ms per image, each step alone on one thread (wall / CPU): "
        + ", ".join(f"{k} {wall[k]:.2f} / {cpu[k]:.2f}" for k in wall)
        + f"\njob {s['job_images_per_s_per_core']:.1f} images/s per core, limit {s['limit_images_per_s_per_core']:.1f}:"
        f" {s['job_over_limit']:.2f} of it\n"
        f"host side {s['host_ms_per_image']:.2f} ms per image = {s['host_images_per_s_per_core']:.0f} images/s per "
        f"core ({s['host_cpu_ms_per_image']:.2f} CPU ms = {s['host_images_per_cpu_second']:.0f} per CPU second); "
        f"threads reach {s['host_threads_over_processes']:.2f} of processes (serial share {s['host_serial_share']:.2f})"
    )
