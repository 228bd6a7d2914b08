"""The ``segpipe`` command line: the parser and the dispatch to ``commands``."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import commands
from pipeline.cli.job_flags import add_config_flags
from pipeline.cli.logs import configure_logging
from pipeline.config import JobConfig
from pipeline.errors import SegpipeError, StorageUnavailable


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segpipe", description="Batch semantic segmentation of image datasets.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    run = _job_parser(sub, "run", "segment every image under an input URI (the segment-dataset flow)", "")
    run.set_defaults(fn=commands.run)

    pl = _job_parser(
        sub,
        "plan",
        "dry run: list the input (or read its manifest) and say how big the job is; nothing is written",
        "Lists the input as a run would (or reads its manifest, or a plan this job saved), and prints images, "
        "bytes, shards and the shards an earlier attempt committed. ",
    )
    pl.add_argument("--save", action="store_true", help="write the plan file into the output: a run then reuses it")
    pl.add_argument(
        "--estimate",
        type=float,
        nargs="?",
        const=5.0,
        metavar="SECONDS",
        help="also time the job's model on the input's first images (5 s unless given) and estimate the run's time",
    )
    pl.add_argument("--json", help="also write the figures here")
    pl.set_defaults(fn=commands.plan)

    sv = sub.add_parser("serve", help="serve the Prefect deployments (nightly, adhoc, evaluate) until interrupted")
    sv.add_argument("--deployments", default="configs/deployments.yaml", help="deployments YAML")
    sv.add_argument("--limit", type=int, help="at most this many flow runs at once")
    sv.set_defaults(fn=commands.serve)

    md = sub.add_parser(
        "models", help="every registry model and its source: parameters, GFLOPs and CPU images/s, measured here"
    )
    md.add_argument("--list", action="store_true", help="names and sources only, nothing measured")
    md.add_argument("--size", type=int, default=512, help="square input size")
    md.add_argument("--seconds", type=float, default=5.0, help="timing per model")
    md.add_argument("--json", help="also write the figures here")
    md.set_defaults(fn=commands.models)

    _add_bench(sub)

    mk = sub.add_parser("make-dataset", help="write a procedural labeled dataset (shapes on textures)")
    mk.add_argument("out", help="output folder; images/ and labels/ are written inside")
    mk.add_argument("--count", type=int, default=100)
    mk.add_argument("--seed", type=int, default=0)
    mk.set_defaults(fn=commands.make_dataset)

    _add_train(sub)
    _add_import(sub)

    rp = sub.add_parser("report", help="(re)build report.html of a finished run, local or s3://")
    rp.add_argument("output", help="the run's output URI")
    rp.add_argument("--gallery", type=int, default=12, help="worst images shown")
    rp.add_argument(
        "--overlays", choices=("none", "sample"), default="none", help="sample: write the gallery's overlays"
    )
    rp.add_argument("--opacity", type=float, default=0.5, help="of the mask over the image")
    rp.set_defaults(fn=commands.report)

    cp = sub.add_parser("compare", help="drift between two finished runs: class shares, PSI, metric changes")
    cp.add_argument("baseline", help="output URI of the earlier run")
    cp.add_argument("current", help="output URI of the run to compare")
    cp.add_argument("--threshold", type=float, help="say drifted when the PSI is above it (exit status 3)")
    cp.add_argument("--html", help="also write the comparison as a page here")
    cp.add_argument("--json", help="also write the figures here")
    cp.set_defaults(fn=commands.compare)

    s3 = sub.add_parser("s3-demo", help="the demo job on a local S3 server (SeaweedFS, from the dev extra)")
    s3.add_argument("--data", required=True, help="a dataset from `segpipe make-dataset`")
    s3.add_argument("--folder", required=True, help="where SeaweedFS keeps its data")
    s3.add_argument("--config", required=True, help="the job config to run on S3")
    s3.set_defaults(fn=commands.s3_demo)
    return p


def _job_parser(sub, name: str, help_text: str, about: str) -> argparse.ArgumentParser:
    """A subcommand that takes a job: --config, and every JobConfig field as a flag."""
    parser = sub.add_parser(
        name,
        help=help_text,
        description=f"{about}Every JobConfig field is a flag; sections as dotted names (--labels.format coco). "
        "Values are YAML (--labels.mapping '{1: 0}'); flags override the --config file.",
    )
    parser.add_argument("--config", help="YAML file of JobConfig fields (see configs/)")
    add_config_flags(parser, JobConfig)
    return parser


def _add_bench(sub) -> None:
    bn = sub.add_parser("bench", help="one workload through ceiling, naive, raydata and segpipe paths, side by side")
    bn.add_argument("--model", default="lraspp_mobilenet_v3_large", help="registry model (random weights)")
    bn.add_argument("--size", type=int, help="square image size (default 512; with --large 4096)")
    bn.add_argument("--count", type=int, default=256, help="images")
    bn.add_argument("--batch-size", type=int, help="default 1 on CPU, 16 on CUDA")
    bn.add_argument(
        "--actors", type=_positive, help="actors of raydata and segpipe, processes of ceiling (2 on CPU, 1 per GPU)"
    )
    bn.add_argument("--device", default="auto")
    bn.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16", "fp16"))
    bn.add_argument(
        "--paths",
        default="ceiling,naive,raydata,segpipe",
        help="comma-separated, in order; also core (the job without Ray, one process)",
    )
    bn.add_argument("--quick", action="store_true", help="32 images of 256x256, batch 4: a smoke run")
    bn.add_argument(
        "--repeat", type=_positive, default=1, help="rounds of all paths in turn; each path reports its fastest"
    )
    bn.add_argument(
        "--overheads", action="store_true", help="instead: planning and reduce time vs dataset size on a local S3"
    )
    bn.add_argument(
        "--increments",
        action="store_true",
        help="instead: planning an increment of 1,000 images over 10k and 100k committed, on a local S3",
    )
    bn.add_argument(
        "--listing",
        action="store_true",
        help="instead: listing --objects tiny objects in 100 folders on a local S3, one folder at a time, several "
        "folders in flight, and with the flat find it replaced (writes <work>/listing.json)",
    )
    bn.add_argument("--objects", type=_positive, default=100_000, help="with --listing: objects to list")
    bn.add_argument(
        "--scale",
        action="store_true",
        help="instead: the driver at scale: planning from a Parquet manifest of --rows image URIs (time, peak RSS) "
        "and the reduce after --shards shard summaries arrived, each in a fresh process, --repeat rounds",
    )
    bn.add_argument("--rows", type=_positive, default=10_000_000, help="with --scale: manifest rows")
    bn.add_argument("--shards", type=_positive, default=100_000, help="with --scale: shard summaries reduced")
    bn.add_argument(
        "--datapath",
        action="store_true",
        help="instead: the job on the 1x1-convolution model pointwise, input and output on a local S3, against the "
        "sum of its steps timed alone (limit), and the host-side steps in threads and in processes (--size, --count, "
        "--actors, --repeat apply; --quick: 32 images of 256x256)",
    )
    bn.add_argument(
        "--storage-client",
        default="s3fs",
        help="with --datapath: storage.client, or several (s3fs,obstore) compared in interleaved rounds",
    )
    bn.add_argument(
        "--large",
        action="store_true",
        help="instead: one large image in slide mode against the forward alone (windows/s), and the peak RSS "
        "of a one-image job on 25, 100 and 400 Mpx PNGs (--model, --size, --batch-size, --device, "
        "--precision and --repeat apply)",
    )
    bn.add_argument("--work", default="~/.cache/segpipe/bench", help="where images and checkpoints are kept")
    bn.add_argument("--json", help="write the report here")
    bn.set_defaults(fn=commands.bench)


def _add_train(sub) -> None:
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
    tr.set_defaults(fn=commands.train)


def _add_import(sub) -> None:
    im = sub.add_parser(
        "import-weights",
        help="make a checkpoint from foreign weights, torchvision's by name, or a torch.export program",
        description="Examples: `import-weights --model deeplabv3_resnet101 --weights COCO_WITH_VOC_LABELS_V1 --out "
        "dl.pt`; `import-weights run.pth --model unet --classes bg,road,car --out s3://b/unet.pt`; "
        "`import-weights model.pt2 --classes bg,road --out model.pt2`.",
    )
    im.add_argument("source", nargs="?", help=".pth/.pt (read as weights only), .safetensors, or .pt2 program")
    im.add_argument("--out", required=True, help="checkpoint URI to write (local, file:// or s3://)")
    im.add_argument("--model", help="registry model the weights are for")
    im.add_argument("--weights", help="torchvision weights of --model by name (their classes and normalisation)")
    im.add_argument("--classes", help="comma-separated class names, in index order")
    im.add_argument("--arch-kwargs", help="YAML mapping of the model builder's arguments, e.g. '{width: 32}'")
    im.add_argument("--mean", help="R,G,B mean in 0..1 (default ImageNet's, or the weights')")
    im.add_argument("--std", help="R,G,B std in 0..1")
    im.add_argument("--palette", help="YAML list of [R, G, B] per class (default the VOC palette)")
    im.add_argument("--input-policy", help="pad (to the stride) or resize (to --size)")
    im.add_argument("--size", help="H,W of the resize policy")
    im.add_argument("--stride", help="the model's output stride (pad policy)")
    im.add_argument("--train-crop", help="H[,W] it was trained on: the default inference tile")
    im.add_argument("--format", choices=("torch", "safetensors"), help="checkpoint format (default torch)")
    im.set_defaults(fn=commands.import_weights)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.fn(args)
    except SegpipeError as e:  # the user must act: a config, a path, a checkpoint, a device
        print(f"segpipe: error: {e}", file=sys.stderr)
        return 2
    except StorageUnavailable as e:  # still down after every retry: try again later
        print(f"segpipe: error: {e} (storage unavailable after retries)", file=sys.stderr)
        return 1
