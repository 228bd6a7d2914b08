"""The ``segpipe`` command: run, serve, make-dataset, train."""

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


def _make_dataset(args: argparse.Namespace) -> int:
    from pipeline.synthetic import make_dataset

    out = make_dataset(args.out, args.count, args.seed)
    print(f"wrote {args.count} images and labels (seed {args.seed}) to {out}/images and {out}/labels")
    return 0


def _train(args: argparse.Namespace) -> int:
    from pipeline.synthetic import CLASS_NAMES
    from pipeline.train import TrainConfig, train

    cfg = TrainConfig(
        data_uri=args.data,
        val_uri=args.val,
        output=args.out,
        model=args.model,
        class_names=tuple(args.classes.split(",")) if args.classes else CLASS_NAMES,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        crop=args.crop,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
    )
    result = train(cfg)
    print(f"best validation mean IoU {result['best_val_mean_iou']:.4f}; checkpoint written to {args.out}")
    return 0


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
    run.add_argument("--actors", type=int, help="Ray actors (one model each)")
    run.add_argument("--batch-size", type=int, help="images per forward pass")
    run.set_defaults(fn=_run)

    sv = sub.add_parser("serve", help="serve the Prefect deployments (nightly, adhoc, evaluate) until interrupted")
    sv.add_argument("--deployments", default="configs/deployments.yaml", help="deployments YAML")
    sv.add_argument("--limit", type=int, help="at most this many flow runs at once")
    sv.set_defaults(fn=_serve)

    mk = sub.add_parser("make-dataset", help="write a procedural labeled dataset (shapes on textures)")
    mk.add_argument("out", help="output folder; images/ and labels/ are written inside")
    mk.add_argument("--count", type=int, default=100)
    mk.add_argument("--seed", type=int, default=0)
    mk.set_defaults(fn=_make_dataset)

    tr = sub.add_parser("train", help="train a registry model on a labeled dataset folder")
    tr.add_argument("--data", required=True, help="training folder with images/ and labels/")
    tr.add_argument("--val", required=True, help="validation folder with images/ and labels/")
    tr.add_argument("--out", required=True, help="checkpoint URI to write (the best epoch)")
    tr.add_argument("--model", default="unet_tiny")
    tr.add_argument("--classes", help="comma-separated class names (default: the procedural dataset's)")
    tr.add_argument("--epochs", type=int, default=40)
    tr.add_argument("--steps-per-epoch", type=int, default=100)
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--crop", type=int, default=96)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")
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
