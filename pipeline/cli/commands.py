"""What each ``segpipe`` subcommand does, given its parsed arguments; heavy imports stay inside each."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from pipeline.cli.job_flags import config_overrides
from pipeline.config import JobConfig, TrainConfig, load_config

log = logging.getLogger("segpipe")


def run(args: argparse.Namespace) -> int:
    """The segment-dataset flow, checked once before Prefect or Ray start: a bad config, path or checkpoint
    stops here with its one-line message, and the flow's plan step reuses the check."""
    from pipeline.errors import StorageUnavailable
    from pipeline.preflight import checked_ahead, preflight
    from pipeline.schedule import job_config

    overrides = config_overrides(args, JobConfig)
    when = datetime.now(UTC).date()  # {date} as the flow fills it for a run nobody scheduled
    cfg = job_config(args.config, overrides, when)
    try:
        ahead = checked_ahead(preflight(cfg))
    except StorageUnavailable as e:  # may pass: the flow's plan step retries it
        log.warning("%s; the flow's plan step will retry", e)
        ahead = contextlib.nullcontext()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.segment_dataset import segment_dataset

    with ahead:
        segment_dataset(config_path=args.config, run_date=when.isoformat(), **overrides)  # logs the summary
    return 0


def plan(args: argparse.Namespace) -> int:
    """``segpipe plan``: the job's size before it runs; with --save, its plan file for the run to reuse."""
    from pipeline.job import plan_job
    from pipeline.schedule import job_config

    cfg = job_config(args.config, config_overrides(args, JobConfig), datetime.now(UTC).date())
    planned = plan_job(cfg, dry_run=not args.save)
    doc = _plan_figures(planned, args.save)
    if args.estimate:
        from pipeline.estimate import estimate

        found = estimate(planned, args.estimate)
        doc |= {"images_per_second_per_actor": found.images_per_second, "actors": found.actors}
        doc |= {"estimated_seconds": found.seconds}
    print(_plan_text(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


def _plan_figures(planned, saved: bool) -> dict:
    from pipeline import storage
    from pipeline.outputs.plan import PLAN_DIR

    cfg, info = planned.cfg, planned.info
    pending = [s.images for s in planned.pending]
    fs, root = cfg.resolve(cfg.output_uri)
    return {
        "input_uri": cfg.input_uri,
        "layout": cfg.input.layout,
        "run_id": planned.run_id,
        "files": info.files,
        "images": info.images,
        "bytes": info.bytes,
        "shards": info.shards,
        "shards_committed": len(planned.committed),
        "shards_to_run": len(planned.pending),
        "images_to_run": None if None in pending else sum(pending),
        "plan_uri": storage.to_uri(fs, storage.join(root, PLAN_DIR)) if saved else None,
        "plan_seconds": round(planned.plan_seconds, 3),
    }


def _plan_text(doc: dict) -> str:
    from pipeline.estimate import elapsed

    def count(n: int | None) -> str:
        return "unknown until read" if n is None else f"{n:,}"

    size = "size unknown" if doc["bytes"] is None else _size(doc["bytes"])
    lines = [
        f"input      {doc['input_uri']} ({doc['layout']} layout), run {doc['run_id']}",
        f"images     {count(doc['images'])} in {doc['files']:,} files, {size}",
        f"shards     {doc['shards']:,}: {doc['shards_committed']:,} committed by an earlier attempt, "
        f"{doc['shards_to_run']:,} to run ({count(doc['images_to_run'])} images)",
        f"plan file  {doc['plan_uri'] or 'not written (--save writes it, and a run then reuses it)'}",
        f"planned in {doc['plan_seconds']} s",
    ]
    if "actors" in doc:
        rate, actors, seconds = doc["images_per_second_per_actor"], doc["actors"], doc["estimated_seconds"]
        lines.append(f"model      {rate} images/s per actor (model only), {actors} actors here")
        lines.append(f"estimate   {elapsed(seconds) if seconds is not None else 'unknown (image count unknown)'}")
    return "\n".join(lines)


def _size(n: int) -> str:
    """``n`` bytes in decimal units: ``812 B``, ``3.4 MB``, ``1.2 TB``."""
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    step = min(len(units) - 1, max(0, (len(str(n)) - 1) // 3))
    return f"{n} B" if step == 0 else f"{n / 1000**step:,.1f} {units[step]}"


def serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.deployments import serve as serve_deployments

    serve_deployments(args.deployments, limit=args.limit)  # a bad file fails before any API call
    return 0


def models(args: argparse.Namespace) -> int:
    from pipeline.models import list_models
    from pipeline.models.profile import profile
    from pipeline.models.registry import MODELS

    if args.list:
        print("| model | source |\n|---|---|")
        print("\n".join(f"| `{name}` | {MODELS.origin(name)} |" for name in list_models()))
    else:
        rows = [
            {**profile(name, size=args.size, seconds=args.seconds), "source": MODELS.origin(name)}
            for name in list_models()
        ]
        threads = rows[0]["torch_threads"]
        print(f"| model | source | parameters | GFLOPs at {args.size}x{args.size} | CPU images/s ({threads} threads) |")
        print("|---|---|---:|---:|---:|")
        for r in rows:
            print(f"| `{r['model']}` | {r['source']} | {r['parameters']:,} | {r['gflops']} | {r['cpu_images_per_s']} |")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    for name, error in MODELS.failures.items():  # plugins that failed to load: listed, not fatal
        print(f"broken plugin `{name}`: {error}")
    return 0


def bench(args: argparse.Namespace) -> int:
    work = Path(args.work).expanduser()
    if args.overheads:
        from pipeline.bench.overheads import measure

        report = measure(work)
        print(json.dumps(report, indent=2))
    elif args.listing:
        from pipeline.bench import listing

        report = listing.measure(work, objects=args.objects)
        print(json.dumps(report, indent=2))
    elif args.scale:
        from pipeline.bench import scale

        report = scale.measure(work, rows=args.rows, shards=args.shards, rounds=args.repeat)
        print(json.dumps(report, indent=2))
    elif args.increments:
        from pipeline.bench import increments

        report = increments.measure(work, rounds=args.repeat)
        print(json.dumps(report, indent=2))
    elif args.datapath:
        from pipeline.bench import datapath

        report = datapath.measure(
            work,
            size=256 if args.quick else args.size or 512,
            count=32 if args.quick else args.count,
            actors=args.actors or 2,
            repeat=args.repeat,
            on_path=lambda name, r: log.info("%s: %s", name, r),
            clients=tuple(c.strip() for c in args.storage_client.split(",")),
        )
        print(datapath.format_summary(report))
    elif args.large:
        from pipeline.bench import large

        report = large.measure(
            work,
            args.model,
            size=args.size or large.DEFAULT_SIZE,
            batch_size=args.batch_size,
            device=args.device,
            precision=args.precision,
            repeat=args.repeat,
            on_run=lambda name, r: log.info("%s: %s", name, r),
        )
        print(large.format_table(report))
    else:
        report = _bench_paths(args, work)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _bench_paths(args: argparse.Namespace, work: Path) -> dict:
    from pipeline.bench.runner import format_table, run_bench
    from pipeline.bench.workload import build
    from pipeline.inference.predictor import resolve_device

    quick = dict(size=256, count=32, batch_size=4) if args.quick else {}
    size, count, batch = (quick.get(k) or getattr(args, k) for k in ("size", "count", "batch_size"))
    size = size or 512
    on_cpu = resolve_device(args.device).type == "cpu"
    # On CPU one image per forward is fastest (larger batches spill the caches); GPUs want full batches.
    batch = batch or (1 if on_cpu else 16)
    actors = args.actors
    if actors is None:  # one actor per GPU, or two on CPU (one thread each on this project's 2 cores)
        import torch

        actors = 2 if on_cpu else torch.cuda.device_count()
    settings = dict(batch_size=batch, actors=actors, device=args.device, precision=args.precision)
    workload = build(work, args.model, size, count, **settings)
    paths = tuple(p.strip() for p in args.paths.split(","))
    report = run_bench(workload, paths, lambda name, r: log.info("%s: %s", name, r), args.repeat)
    print(format_table(report))
    return report


def make_dataset(args: argparse.Namespace) -> int:
    from pipeline.synthetic import make_dataset as write_dataset

    out = write_dataset(args.out, args.count, args.seed)
    print(f"wrote {args.count} images and labels (seed {args.seed}) to {out}/images and {out}/labels")
    return 0


def train(args: argparse.Namespace) -> int:
    from pipeline.synthetic import CLASS_NAMES
    from pipeline.train import train as train_model

    overrides = dict(
        model=args.model,
        output_uri=args.out,
        class_names=args.classes.split(",") if args.classes else None,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        crop=args.crop,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        init_checkpoint_uri=args.init,
        checkpoint_format=args.format,
    )
    # --data/--val name folders as `segpipe make-dataset` writes them: images/ and index-PNG labels/.
    for key, folder in (("train", args.data), ("val", args.val)):
        if folder:
            overrides[key] = {"input_uri": f"{folder}/images", "labels_uri": f"{folder}/labels"}
    if not args.config and not args.classes:
        overrides["class_names"] = list(CLASS_NAMES)
    cfg = load_config(args.config, schema=TrainConfig, **overrides)
    result = train_model(cfg)
    print(f"best validation mean IoU {result['best_val_mean_iou']:.4f}; checkpoint written to {cfg.output_uri}")
    return 0


def import_weights(args: argparse.Namespace) -> int:
    """Validate the arguments as an ImportConfig, read the source, write the checkpoint, print its sha256."""
    import yaml

    from pipeline.config import ImportConfig
    from pipeline.models.checkpoint import read_checkpoint, sha256_hex
    from pipeline.models.weights_import import import_weights as make_checkpoint
    from pipeline.storage import write_bytes

    def items(text: str | None) -> list[str] | None:
        return [v.strip() for v in text.split(",")] if text else None

    cfg = load_config(
        schema=ImportConfig,
        source_uri=args.source,
        output_uri=args.out,
        model=args.model,
        weights=args.weights,
        class_names=items(args.classes),
        arch_kwargs=yaml.safe_load(args.arch_kwargs) if args.arch_kwargs else None,
        mean=items(args.mean),
        std=items(args.std),
        palette=yaml.safe_load(args.palette) if args.palette else None,
        input_policy=args.input_policy,
        size=items(args.size),
        stride=args.stride,
        train_crop=items(args.train_crop),
        checkpoint_format=args.format,
    )
    source = read_checkpoint(cfg.resolve, cfg.source_uri) if cfg.source_uri else None
    data = make_checkpoint(cfg, source)
    write_bytes(*cfg.resolve(cfg.output_uri), data)
    print(f"wrote {cfg.output_uri} ({len(data):,} bytes, sha256 {sha256_hex(data)})")
    return 0


def report(args: argparse.Namespace) -> int:
    from pipeline import storage
    from pipeline.report.page import write_report

    fs, root = storage.resolve(args.output)
    print(write_report(fs, root, storage.resolve, args.gallery, args.overlays, args.opacity))
    return 0


def compare(args: argparse.Namespace) -> int:
    """Print the comparison as markdown; exit status 3 when ``--threshold`` is given and exceeded."""
    from pipeline import storage
    from pipeline.report import drift

    result = drift.compare_runs(storage.resolve(args.baseline), storage.resolve(args.current))
    print(drift.to_markdown(result, args.threshold))
    if args.html:
        Path(args.html).write_text(drift.to_html(result, args.threshold))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2))
    return 3 if args.threshold is not None and result.psi > args.threshold else 0


def s3_demo(args: argparse.Namespace) -> int:
    """The demo job with every URI on a local S3 server (SeaweedFS) that this command starts and stops."""
    import tempfile

    import yaml

    from flows.segment_dataset import segment_dataset
    from pipeline.devtools.local_s3 import LocalS3

    data, base = Path(args.data), yaml.safe_load(Path(args.config).read_text())
    checkpoint = Path(base["checkpoint_uri"]).name
    with LocalS3(args.folder) as s3:
        fs, bucket = s3.fs(), "segpipe-demo"
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        fs.put(str(data / "images"), f"{bucket}/data/images", recursive=True)
        fs.put(str(data / "labels"), f"{bucket}/data/labels", recursive=True)
        fs.put(base["checkpoint_uri"], f"{bucket}/models/{checkpoint}")
        job = base | {
            "input_uri": f"s3://{bucket}/data/images",
            "labels_uri": f"s3://{bucket}/data/labels",
            "output_uri": f"s3://{bucket}/outputs/demo",
            "checkpoint_uri": f"s3://{bucket}/models/{checkpoint}",
            "storage": s3.storage_config(),
        }
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            yaml.safe_dump(job, f)
            f.flush()
            segment_dataset(config_path=f.name)
        found = len(fs.find(f"{bucket}/outputs/demo"))
        log.info("S3 demo outputs: %d objects under s3://%s/outputs/demo (data kept in %s)", found, bucket, args.folder)
    return 0
