"""What a finished run reports: the one-screen summary, and the contents of its Prefect artifacts."""

from __future__ import annotations

import base64

from pipeline.outputs import Manifest


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}%"


def _errors(counts) -> str:
    """``3 errors`` and, when there are any, how many of each kind: ``(model 1, process_died 1, too_large 1)``."""
    kinds = ", ".join(f"{kind} {n}" for kind, n in counts.error_kinds.items())
    return f"{counts.errors} errors" + (f" ({kinds})" if kinds else "")


def increment_line(manifest: Manifest) -> str | None:
    """``increment 3: 35 images segmented (30 new, 5 changed, 3 deleted files, 3 pruned)``, for an incremental
    result set; None for a full run."""
    if not manifest.incremental or not manifest.increments:
        return None
    i = manifest.increments[-1]
    return (
        f"increment {i.number}: {i.processed} images segmented ({i.new_files} new, {i.changed_files} changed, "
        f"{i.deleted_files} deleted files, {i.pruned_files} pruned)"
    )


def format_summary(manifest: Manifest, metrics: dict) -> str:
    counts, timings = manifest.counts, manifest.timings
    ips = timings.images_per_second
    lines = [
        f"run {manifest.run_id}  model {manifest.model.name}  ->  {manifest.config['output_uri']}",
        f"images {counts.images}  {_errors(counts)}  labeled {counts.labeled}  "
        f"shards {counts.shards} ({counts.shards_skipped} skipped, committed earlier)",
        f"throughput {ips if ips is not None else 'n/a'} images/s  "
        f"(plan {timings.plan_seconds}s, infer {timings.infer_seconds}s, reduce {timings.reduce_seconds}s)",
    ]
    if increment := increment_line(manifest):
        lines.insert(1, increment)
    if metrics["labeled_pixels"]:
        lines += [
            f"pixel accuracy {_pct(metrics['pixel_accuracy'])}  mean accuracy {_pct(metrics['mean_accuracy'])}  "
            f"mean IoU {_pct(metrics['mean_iou'])}  frequency-weighted IoU {_pct(metrics['frequency_weighted_iou'])}",
            "per-class IoU: " + ", ".join(f"{name} {_pct(c['iou'])}" for name, c in metrics["per_class"].items()),
        ]
    else:
        lines.append("no labels: dataset metrics not computed")
    vectors = "vectors/*.parquet, " if manifest.config.get("outputs", {}).get("vectors") else ""
    lines.append(f"outputs: masks/, stats/*.parquet, {vectors}metrics.json, confusion_matrix.parquet, manifest.json")
    return "\n".join(lines)


def metrics_table(metrics: dict) -> list[dict]:
    """Rows of the metrics table artifact: the dataset metrics, then IoU, Dice, precision and recall per class."""
    keys = ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou")
    rows = [{"metric": k, "class": "(dataset)", "value": _number(metrics[k])} for k in keys]
    for name, c in metrics["per_class"].items():
        rows += [{"metric": k, "class": name, "value": _number(c[k])} for k in ("iou", "dice", "precision", "recall")]
    return rows


def summary_markdown(
    manifest: Manifest, metrics: dict, report_uri: str | None = None, heatmap_png: bytes | None = None
) -> str:
    """The markdown artifact: where the outputs are, counts, throughput and model; the headline metrics and
    the confusion heatmap when labeled; the report's link when there is one."""
    counts, timings, model, config = manifest.counts, manifest.timings, manifest.model, manifest.config
    ips = timings.images_per_second
    lines = [
        f"# segpipe run `{manifest.run_id}`",
        "",
        f"- **output**: `{config['output_uri']}`",
        f"- **input**: `{config['input_uri']}` ({config['input']['layout']})",
        f"- **model**: `{model.name}` ({len(model.class_names)} classes), "
        f"{model.source or f'checkpoint {model.checkpoint_uri}'} (sha256 `{model.checkpoint_sha256[:12]}`)",
        f"- **images**: {counts.images} ({_errors(counts)}, {counts.labeled} labeled)",
        f"- **shards**: {counts.shards} ({counts.shards_skipped} skipped, committed earlier)",
        f"- **throughput**: {ips if ips is not None else 'n/a'} images/s; plan {timings.plan_seconds} s, "
        f"infer {timings.infer_seconds} s, reduce {timings.reduce_seconds} s",
    ]
    if increment := increment_line(manifest):
        lines.insert(6, f"- {increment}")
    if metrics["labeled_pixels"]:
        lines.append(
            f"- **mean IoU**: {_pct(metrics['mean_iou'])}, pixel accuracy {_pct(metrics['pixel_accuracy'])}, "
            f"mean accuracy {_pct(metrics['mean_accuracy'])}, "
            f"frequency-weighted IoU {_pct(metrics['frequency_weighted_iou'])}"
        )
    if report_uri:
        lines.append(f"- **report**: [{report_uri}]({report_uri})")
    if heatmap_png:
        lines += ["", f"![confusion, rows normalised](data:image/png;base64,{base64.b64encode(heatmap_png).decode()})"]
    return "\n".join(lines)


def _number(v) -> float | None:
    return None if v is None or v != v else round(float(v), 6)
