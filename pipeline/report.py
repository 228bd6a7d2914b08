"""The one-screen summary a run ends with."""

from __future__ import annotations


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}%"


def format_summary(result: dict) -> str:
    man, met = result["manifest"], result["metrics"]
    counts, timings = man["counts"], man["timings"]
    ips = timings["images_per_second"]
    lines = [
        f"run {man['run_id']}  model {man['model']['name']}  ->  {man['config']['output_uri']}",
        f"images {counts['images']}  errors {counts['errors']}  labeled {counts['labeled']}  "
        f"shards {counts['shards']} ({counts['shards_skipped']} skipped, committed earlier)",
        f"throughput {ips if ips is not None else 'n/a'} images/s  "
        f"(plan {timings['plan_seconds']}s, infer {timings['infer_seconds']}s, reduce {timings['reduce_seconds']}s)",
    ]
    if met["labeled_pixels"]:
        lines += [
            f"pixel accuracy {_pct(met['pixel_accuracy'])}  mean accuracy {_pct(met['mean_accuracy'])}  "
            f"mean IoU {_pct(met['mean_iou'])}  frequency-weighted IoU {_pct(met['frequency_weighted_iou'])}",
            "per-class IoU: " + ", ".join(f"{name} {_pct(c['iou'])}" for name, c in met["per_class"].items()),
        ]
    else:
        lines.append("no labels: dataset metrics not computed")
    lines.append("outputs: masks/, stats/*.parquet, metrics.json, confusion_matrix.parquet, manifest.json")
    return "\n".join(lines)
