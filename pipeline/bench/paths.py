"""The paths of ``segpipe bench``. ``python -m pipeline.bench.paths <path> '<workload json>'`` runs one and
prints ``{"images": n, "seconds": s}`` and what else the path reports (segpipe and core add their manifest's
``timings``; ceiling and core on CUDA add ``gpu_peak_mb``, the most memory PyTorch's tensors held on one GPU;
limit and host, the data path's own measures, add theirs): wall time of the work itself, after imports. Ray,
where a path uses it, is started before the clock (both Ray paths alike); model loading is inside it except for
``ceiling``, which measures the forward pass alone."""

from __future__ import annotations

import dataclasses
import json
import queue
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from pipeline.bench.workload import Workload


def _load(w: Workload):
    """The workload's model, in a process whose CPU arithmetic flushes denormals, as Predictor's does: a
    random initialisation's tiny values would otherwise make the figures depend on the seed."""
    from pipeline.cpu_tuning import flush_denormals
    from pipeline.models.checkpoint import load_checkpoint

    flush_denormals()
    return load_checkpoint(Path(w.checkpoint).read_bytes(), w.checkpoint)


def ceiling(w: Workload) -> tuple[int, float, dict]:
    """Forward passes and argmax over pre-decoded, normalised inputs already on the device, in segpipe's own
    process layout: ``actors`` processes at once, each with the torch threads a segpipe actor gets. One
    process with every thread is not the ceiling: on one thread per process PyTorch's convolutions take
    other paths, and two single-threaded processes can outrun it."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fork would copy this process's threads and torch state
    shares = [len(range(i, -(-w.count // w.batch_size), w.actors)) for i in range(w.actors)]
    start, spans = ctx.Barrier(w.actors), ctx.Queue()
    procs = [ctx.Process(target=_forward_only, args=(w, i, n, start, spans)) for i, n in enumerate(shares)]
    for p in procs:
        p.start()
    got: list[tuple[float, float, float | None]] = []
    while len(got) < len(procs):
        try:
            got.append(spans.get(timeout=1))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                start.abort()  # the others wait at the barrier for it
                raise RuntimeError("a ceiling process failed; its traceback is above") from None
    for p in procs:
        p.join()
    seconds = max(end for _, end, _ in got) - min(begin for begin, _, _ in got)
    peaks = [peak for _, _, peak in got if peak is not None]
    return sum(shares) * w.batch_size, seconds, {"gpu_peak_mb": max(peaks)} if peaks else {}


def _forward_only(w: Workload, index: int, batches: int, start, spans) -> None:
    """Ceiling process ``index``: ``batches`` forward passes over a few distinct inputs, timed on the
    system-wide monotonic clock so that the processes' spans can be compared. On a machine with several
    GPUs the processes spread over them, as Ray spreads the actors."""
    import torch

    from pipeline.images import decode_rgb
    from pipeline.inference.predictor import Predictor

    torch.set_num_threads(max(1, _cpus() // w.actors))
    if w.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(index % torch.cuda.device_count())
    model, meta = _load(w)
    pred = Predictor(model, meta, device=w.device, batch_size=w.batch_size, precision=w.precision)
    files = sorted(Path(w.images).glob("*.jpg"))[: 4 * w.batch_size]
    inputs = [
        pred.to_input([decode_rgb(f.read_bytes()) for f in files[i : i + w.batch_size]])
        for i in range(0, len(files), w.batch_size)
    ]
    with torch.inference_mode(), pred.autocast():
        for x in inputs:  # warm-up
            pred.model(x).argmax(1)
        _sync(pred.device)
        start.wait()
        begin = time.monotonic()
        for i in range(batches):
            pred.model(inputs[i % len(inputs)]).argmax(1)
        _sync(pred.device)
    spans.put((begin, time.monotonic(), _gpu_peak_mb()))


def naive(w: Workload) -> tuple[int, float]:
    """What a user writes first: one image at a time, fp32, PNG and row per image, Parquet at the end."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    start = time.perf_counter()
    model, meta = _load(w)
    mean, std = torch.tensor(meta.mean).view(3, 1, 1), torch.tensor(meta.std).view(3, 1, 1)
    out = Path(tempfile.mkdtemp(prefix="bench-naive-"))
    rows = []
    for f in sorted(Path(w.images).glob("*.jpg")):
        img = np.asarray(Image.open(f).convert("RGB"))
        x = ((torch.from_numpy(img).permute(2, 0, 1).float() / 255 - mean) / std)[None]
        with torch.no_grad():
            mask = model(x).argmax(1)[0].numpy().astype(np.uint8)
        Image.fromarray(mask, mode="L").save(out / f"{f.stem}.png")
        rows.append({"image": f.name, "class_pixels": np.bincount(mask.ravel(), minlength=meta.num_classes).tolist()})
    pq.write_table(pa.Table.from_pylist(rows), out / "stats.parquet")
    return len(rows), time.perf_counter() - start


def raydata(w: Workload) -> tuple[int, float]:
    """Ray Data's documented batch-inference pattern with a callable-class predictor on an actor pool."""
    import ray

    ray.init(num_cpus=_cpus(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    out = tempfile.mkdtemp(prefix="bench-raydata-")
    start = time.perf_counter()
    # A stall must fail the run, not wait out Ray Data's 30-minute default.
    ray.data.DataContext.get_current().execution_no_progress_timeout_s = 300
    ds = ray.data.read_images(w.images, mode="RGB", include_paths=True)
    ds = ds.map_batches(
        _RayDataPredictor,
        fn_constructor_kwargs={"workload": w},
        batch_size=w.batch_size,
        concurrency=w.actors,
        # Ray Data's read tasks need a CPU of their own; actors holding every CPU would starve them forever.
        num_cpus=max(_cpus() - 1, 1) / w.actors,
        # Ray hides the GPUs from an actor that reserves none; shared as segpipe's own actors share them.
        num_gpus=_gpu_share(w),
    )
    ds.write_parquet(out)
    images = sum(_parquet_rows(f) for f in Path(out).glob("*.parquet"))
    return images, time.perf_counter() - start


class _RayDataPredictor:
    def __init__(self, workload: Workload) -> None:
        import torch

        torch.set_num_threads(max(1, _cpus() // workload.actors))
        from pipeline.inference.predictor import Predictor

        model, meta = _load(workload)
        self.predictor = Predictor(model, meta, workload.device, workload.batch_size, workload.precision)
        self.num_classes = meta.num_classes

    def __call__(self, batch: dict) -> dict:
        from pipeline.palette import mask_to_png
        from pipeline.stats import class_pixels

        preds = self.predictor.predict(list(batch["image"]))
        return {
            "path": batch["path"],
            "mask_png": np.array([mask_to_png(p.mask) for p in preds], dtype=object),
            "class_pixels": np.stack([class_pixels(p.mask, self.num_classes) for p in preds]),
        }


def segpipe(w: Workload) -> tuple[int, float, dict]:
    """The real job: plan, actors, masks, stats parts, reduce, manifest (without Prefect's orchestration)."""
    import ray

    from pipeline.execution import run_shards

    ray.init(num_cpus=_cpus(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    return _job(w, run_shards, shards_per_worker=4 * w.actors)


def core(w: Workload) -> tuple[int, float, dict]:
    """The same job without Ray: one ShardProcessor in this process, its IO threads decoding and encoding around
    the model. What runs on a machine that has torch but no Ray, and what one GPU actor does."""
    from pipeline.execution import run_inline

    images, seconds, detail = _job(w, run_inline, shards_per_worker=4)
    peak = _gpu_peak_mb()
    return images, seconds, detail | ({"gpu_peak_mb": peak} if peak is not None else {})


def _job(w: Workload, run, shards_per_worker: int) -> tuple[int, float, dict]:
    from pipeline.config import load_config
    from pipeline.job import finalize_job, plan_job

    out = f"{w.images.split('/')[2]}/bench-out/{uuid.uuid4().hex}" if w.storage else None
    start = time.perf_counter()
    cfg = load_config(
        None,
        input_uri=w.images,
        output_uri=f"s3://{out}" if out else tempfile.mkdtemp(prefix="bench-segpipe-"),
        storage=w.storage or {},
        checkpoint_uri=w.checkpoint,
        batch_size=w.batch_size,
        actors=w.actors,
        # Enough shards for every worker to hold two at once (one reading while the other computes).
        shard_size=max(w.batch_size, w.count // shards_per_worker),
        device=w.device,
        precision=w.precision,
    )
    plan = plan_job(cfg)
    infer_start = time.perf_counter()
    summaries = run(plan.cfg, plan.run_id, plan.pending)
    result = finalize_job(plan, summaries, time.perf_counter() - infer_start)
    seconds = time.perf_counter() - start
    return result["manifest"]["counts"]["images"], seconds, {"timings": result["manifest"]["timings"]}


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _gpu_share(w: Workload) -> float:
    import torch

    from pipeline.execution import gpu_share

    return gpu_share(w.actors, torch.cuda.device_count()) if w.device != "cpu" else 0.0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _gpu_peak_mb() -> float | None:
    """The most memory this process's tensors held on one GPU (torch.cuda.max_memory_allocated), or None where it
    did not use CUDA."""
    import torch

    if not torch.cuda.is_initialized():
        return None
    peak = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    return round(peak / 2**20, 1)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def limit(w: Workload) -> tuple[int, float, dict]:
    from pipeline.bench import datapath

    return datapath.limit(w)


def host(w: Workload) -> tuple[int, float, dict]:
    from pipeline.bench import datapath

    return datapath.host(w)


PATHS = {
    "ceiling": ceiling,
    "naive": naive,
    "raydata": raydata,
    "segpipe": segpipe,
    "core": core,
    "limit": limit,  # the data path's steps alone (pipeline/bench/datapath.py)
    "host": host,
}

if __name__ == "__main__":
    # "<path>:<client>": the path with storage.client <client> (segpipe bench --datapath compares clients)
    name, _, client = sys.argv[1].partition(":")
    workload = Workload.from_json(sys.argv[2])
    if client:
        workload = dataclasses.replace(workload, storage=(workload.storage or {}) | {"client": client})
    images, seconds, *detail = PATHS[name](workload)
    print(json.dumps({"images": images, "seconds": seconds, **(detail[0] if detail else {})}))
    sys.stdout.flush()
