"""Two finished runs compared: each class's share of the predicted pixels in both, the population stability
index (PSI) per class and in total, the metric deltas when both are labeled, and the images in one run only.

PSI = sum over classes of (b - a) * ln(b / a), a and b the class shares of the baseline and the new run, each
floored at ``FLOOR`` so a class absent from one run gives a large but finite term. It is 0 for identical
shares; by the usual reading, below 0.1 is stable, 0.1-0.25 a moderate shift, above 0.25 a major one.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError
from pipeline.outputs import Manifest, part_paths, read_tables
from pipeline.report import charts
from pipeline.report.run_data import load_run

FLOOR = 1e-6
SHOWN_IDS = 20  # image ids listed of those in one run only
_METRICS = ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou")


@dataclass(frozen=True)
class Comparison:
    baseline: str  # URIs
    current: str
    class_names: list[str]
    baseline_share: np.ndarray
    current_share: np.ndarray
    psi_per_class: np.ndarray
    metric_deltas: dict[str, float] | None  # current - baseline, when both runs are labeled
    only_in_baseline: int
    only_in_current: int
    only_examples: list[str]  # a few ids of either kind

    @property
    def psi(self) -> float:
        return float(self.psi_per_class.sum())

    def to_json(self) -> dict:
        return {
            "baseline": self.baseline,
            "current": self.current,
            "psi": self.psi,
            "per_class": {
                name: {"baseline_share": float(a), "current_share": float(b), "psi": float(p)}
                for name, a, b, p in zip(
                    self.class_names, self.baseline_share, self.current_share, self.psi_per_class, strict=True
                )
            },
            "metric_deltas": self.metric_deltas,
            "only_in_baseline": self.only_in_baseline,
            "only_in_current": self.only_in_current,
        }


def psi_terms(baseline: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Each class's PSI term, from two share vectors (summing to 1, or all zero)."""
    a, b = np.maximum(baseline, FLOOR), np.maximum(current, FLOOR)
    return (b - a) * np.log(b / a)


def shares(class_pixels: np.ndarray) -> np.ndarray:
    total = class_pixels.sum()
    return class_pixels / total if total else np.zeros(len(class_pixels))


def compare_runs(baseline: tuple, current: tuple) -> Comparison:
    """Compare the finished runs at ``baseline`` and ``current``, each ``(fs, root)``."""
    a, b = load_run(*baseline, worst=0), load_run(*current, worst=0)
    if a.class_names != b.class_names:
        raise InputError(f"runs {a.uri} and {b.uri} have different classes: {a.class_names} vs {b.class_names}")
    ids_a, ids_b = _image_ids(baseline[0], baseline[1], a.manifest), _image_ids(current[0], current[1], b.manifest)
    deltas = None
    if a.labeled and b.labeled:
        deltas = {k: _delta(b.metrics[k], a.metrics[k]) for k in _METRICS}
    share_a, share_b = shares(a.class_pixels), shares(b.class_pixels)
    only = sorted(ids_a ^ ids_b)
    return Comparison(
        baseline=a.uri,
        current=b.uri,
        class_names=a.class_names,
        baseline_share=share_a,
        current_share=share_b,
        psi_per_class=psi_terms(share_a, share_b),
        metric_deltas=deltas,
        only_in_baseline=len(ids_a - ids_b),
        only_in_current=len(ids_b - ids_a),
        only_examples=only[:SHOWN_IDS],
    )


def to_markdown(c: Comparison, threshold: float | None = None) -> str:
    verdict = (
        ""
        if threshold is None
        else (" — **drifted**" if c.psi > threshold else " — stable") + f" (threshold {threshold})"
    )
    lines = [
        f"# Drift: `{c.current}` against `{c.baseline}`",
        "",
        f"population stability index of the class shares: **{c.psi:.4f}**{verdict}",
        "",
        "| class | baseline share | current share | PSI term |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {a:.2%} | {b:.2%} | {p:.4f} |"
            for name, a, b, p in zip(c.class_names, c.baseline_share, c.current_share, c.psi_per_class, strict=True)
        ),
    ]
    if c.metric_deltas is not None:
        lines += ["", "| metric | change |", "|---|---:|"]
        lines += [f"| {k} | {_signed(v)} |" for k, v in c.metric_deltas.items()]
    lines += ["", f"images only in the baseline: {c.only_in_baseline}, only in the current run: {c.only_in_current}"]
    return "\n".join(lines)


def to_section(c: Comparison, threshold: float | None = None) -> str:
    """The comparison as an HTML section: the class shares side by side, the PSI terms, the metric changes."""
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{a:.2%}</td><td>{b:.2%}</td><td>{p:.4f}</td></tr>"
        for n, a, b, p in zip(c.class_names, c.baseline_share, c.current_share, c.psi_per_class, strict=True)
    )
    deltas = ""
    if c.metric_deltas is not None:
        cells = "".join(f"<tr><td>{k}</td><td>{_signed(v)}</td></tr>" for k, v in c.metric_deltas.items())
        deltas = f"<h3>Metrics, current − baseline</h3><table>{cells}</table>"
    bars = charts.class_share_bars({"baseline": c.baseline_share, "current": c.current_share}, c.class_names)
    verdict = (
        "" if threshold is None else (" (drifted)" if c.psi > threshold else " (stable)") + f", threshold {threshold}"
    )
    return (
        f"<h2>Drift against the baseline</h2><p>current <code>{html.escape(c.current)}</code><br>baseline "
        f"<code>{html.escape(c.baseline)}</code></p><p>population stability index: <b>{c.psi:.4f}</b>{verdict}</p>"
        "<table><tr><th>class</th><th>baseline share</th><th>current share</th><th>PSI term</th></tr>"
        f"{rows}</table>{bars}{deltas}<p>images only in the baseline: {c.only_in_baseline}, only in the current "
        f"run: {c.only_in_current}</p>"
    )


def to_html(c: Comparison, threshold: float | None = None) -> str:
    """The section as a page of its own."""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>segpipe drift</title>"
        "<style>body{font:14px system-ui,sans-serif;margin:2rem auto;max-width:1000px}td,th{padding:.2rem .7rem}"
        f"</style></head><body>{to_section(c, threshold)}</body></html>\n"
    )


def _image_ids(fs, root: str, manifest: Manifest) -> set[str]:
    ids: set[str] = set()
    for table in read_tables(fs, part_paths(root, manifest), ["image_id"]):
        ids.update(table["image_id"].to_pylist())
    return ids


def _delta(new, old) -> float | None:
    return None if new is None or old is None else float(new) - float(old)


def _signed(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.2f} points"
