"""The ``segpipe`` command: run, serve, bench, make-dataset, train, models."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.errors import SegpipeError

log = logging.getLogger("segpipe")


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from pipeline.config import load_config
    from pipeline.job import preflight

    overrides = dict(
        input_uri=args.input,
        output_uri=args.output,
        labels_uri=args.labels,
        checkpoint_uri=args.checkpoint,
        model=args.model,
        shard_size=args.shard_size,
        actors=args.actors,
        batch_size=args.batch_size,
    )
    # Fail on a bad config, path or checkpoint before Prefect or Ray start; the flow checks again.
    preflight(load_config(args.config, **overrides))
    from flows.segment_dataset import segment_dataset

    segment_dataset(config_path=args.config, **overrides)  # the flow logs the end-of-run summary
    return 0


def _serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.deployments import serve

    serve(args.deployments, limit=args.limit)  # a bad file fails before any API call
    return 0


def _models(args: argparse.Namespace) -> int:
    import json

    from pipeline.models import list_models
    from pipeline.models.profile import profile

    rows = [profile(name, size=args.size, seconds=args.seconds) for name in list_models()]
    threads = rows[0]["torch_threads"]
    print(f"| model | parameters | GFLOPs at {args.size}x{args.size} | CPU images/s ({threads} threads) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| `{r['model']}` | {r['parameters']:,} | {r['gflops']} | {r['cpu_images_per_s']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _bench(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    work = Path(args.work).expanduser()
    if args.overheads:
        from pipeline.bench.overheads import measure

        report = measure(work)
        print(json.dumps(report, indent=2))
    else:
        from pipeline.bench.runner import format_table, run_bench
        from pipeline.bench.workload import build
        from pipeline.predictor import resolve_device

        quick = dict(size=256, count=32, batch_size=4) if args.quick else {}
        size, count, batch = (quick.get(k) or getattr(args, k) for k in ("size", "count", "batch_size"))
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
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _make_dataset(args: argparse.Namespace) -> int:
    from pipeline.synthetic import make_dataset

    out = make_dataset(args.out, args.count, args.seed)
    print(f"wrote {args.count} images and labels (seed {args.seed}) to {out}/images and {out}/labels")
    return 0


def _train(args: argparse.Namespace) -> int:
    from pipeline.config import TrainConfig, load_config
    from pipeline.synthetic import CLASS_NAMES
    from pipeline.train import train

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
    result = train(cfg)
    print(f"best validation mean IoU {result['best_val_mean_iou']:.4f}; checkpoint written to {cfg.output_uri}")
    return 0


def _actors(value: str) -> int | str:
    return value if value == "auto" else int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segpipe", description="Batch semantic segmentation of image datasets.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="segment every image under an input URI (the segment-dataset flow)")
    run.add_argument("--config", help="YAML file of JobConfig fields (see configs/)")
    run.add_argument("--input", help="input URI: images, tar shards or Parquet files (a folder, prefix or one file)")
    run.add_argument("--labels", help="labels URI: a folder of label files, or a COCO JSON (see labels.format)")
    run.add_argument("--output", help="output URI")
    run.add_argument("--model", help="registry model name")
    run.add_argument("--checkpoint", help="checkpoint URI")
    run.add_argument("--shard-size", type=int, help="images per shard")
    run.add_argument("--actors", type=_actors, help="Ray actors (one model each), or auto: from the cluster")
    run.add_argument("--batch-size", type=int, help="images per forward pass")
    run.set_defaults(fn=_run)

    sv = sub.add_parser("serve", help="serve the Prefect deployments (nightly, adhoc, evaluate) until interrupted")
    sv.add_argument("--deployments", default="configs/deployments.yaml", help="deployments YAML")
    sv.add_argument("--limit", type=int, help="at most this many flow runs at once")
    sv.set_defaults(fn=_serve)

    md = sub.add_parser("models", help="every registry model: parameters, GFLOPs and CPU images/s, measured here")
    md.add_argument("--size", type=int, default=512, help="square input size")
    md.add_argument("--seconds", type=float, default=5.0, help="timing per model")
    md.add_argument("--json", help="also write the figures here")
    md.set_defaults(fn=_models)

    bn = sub.add_parser("bench", help="one workload through ceiling, naive, raydata and segpipe paths, side by side")
    bn.add_argument("--model", default="lraspp_mobilenet_v3_large", help="registry model (random weights)")
    bn.add_argument("--size", type=int, default=512, help="square image size")
    bn.add_argument("--count", type=int, default=256, help="images")
    bn.add_argument("--batch-size", type=int, help="default 1 on CPU, 16 on CUDA")
    bn.add_argument(
        "--actors", type=_positive, help="actors of raydata and segpipe, processes of ceiling (2 on CPU, 1 per GPU)"
    )
    bn.add_argument("--device", default="auto")
    bn.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    bn.add_argument("--paths", default="ceiling,naive,raydata,segpipe", help="comma-separated subset, in order")
    bn.add_argument("--quick", action="store_true", help="32 images of 256x256, batch 4: a smoke run")
    bn.add_argument(
        "--repeat", type=_positive, default=1, help="rounds of all paths in turn; each path reports its fastest"
    )
    bn.add_argument(
        "--overheads", action="store_true", help="instead: planning and reduce time vs dataset size on a local S3"
    )
    bn.add_argument("--work", default="~/.cache/segpipe/bench", help="where images and checkpoints are kept")
    bn.add_argument("--json", help="write the report here")
    bn.set_defaults(fn=_bench)

    mk = sub.add_parser("make-dataset", help="write a procedural labeled dataset (shapes on textures)")
    mk.add_argument("out", help="output folder; images/ and labels/ are written inside")
    mk.add_argument("--count", type=int, default=100)
    mk.add_argument("--seed", type=int, default=0)
    mk.set_defaults(fn=_make_dataset)

    tr = sub.add_parser("train", help="fine-tune a registry model on a labeled dataset (any layout and label format)")
    tr.add_argument("--config", help="YAML of TrainConfig fields: model, class_names, train, val, output_uri, ...")
    tr.add_argument("--data", help="training folder with images/ and labels/ (as make-dataset writes)")
    tr.add_argument("--val", help="validation folder with images/ and labels/")
    tr.add_argument("--out", help="checkpoint URI to write (the best epoch)")
    tr.add_argument("--model", help="registry model name (default unet_tiny)")
    tr.add_argument("--classes", help="comma-separated class names (default: the procedural dataset's)")
    tr.add_argument("--init", help="checkpoint to start from (tensors that fit are copied)")
    tr.add_argument("--format", choices=("torch", "safetensors"), help="checkpoint format (default torch)")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--steps-per-epoch", type=int)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--crop", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--seed", type=int)
    tr.add_argument("--device")
    tr.set_defaults(fn=_train)
    return p


# Kept at WARNING even with -v: httpx logs every Prefect API call, and the AWS clients log request
# signing (access key ids included) at DEBUG.
QUIET_LOGGERS = ("httpx", "botocore", "aiobotocore", "s3fs", "urllib3")


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.fn(args)
    except SegpipeError as e:
        print(f"segpipe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
