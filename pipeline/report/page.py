"""``report.html``: one self-contained page per run (charts as inline SVG, thumbnails as inline PNG, no
script, nothing fetched), built from the run's aggregates, so it opens at once whatever the run's size.
"""

from __future__ import annotations

import base64
import html
import logging
import time

import numpy as np

from pipeline import storage
from pipeline.outputs import overlay_path
from pipeline.palette import voc_colormap
from pipeline.report import charts
from pipeline.report.gallery import Gallery, Tile
from pipeline.report.run_data import RunData, load_run
from pipeline.report.summary import increment_line

log = logging.getLogger(__name__)

REPORT = "report.html"
_PICTURES = (("image", "image"), ("truth", "ground truth"), ("prediction", "prediction"), ("errors", "errors"))

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { padding: .2rem .7rem; border-bottom: 1px solid #eee;
text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.facts td:first-child { color: #666; } .charts { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
.chart svg { max-width: 100%; height: auto; } .tiles { display: flex; flex-wrap: wrap; gap: 1rem; }
.tile { border: 1px solid #ddd; padding: .5rem; } .tile img { margin: 2px; vertical-align: top; }
.tile .id { font-weight: 600; word-break: break-all; } .note { color: #a60; } .muted { color: #777; }
.legend span { display: inline-block; width: .9em; height: .9em; margin: 0 .3em 0 1em; vertical-align: middle; }
"""


def write_report(
    fs, root: str, resolve, worst: int = 12, overlays: str = "none", opacity: float = 0.5, extra: str = ""
) -> str:
    """Build the run's report at ``root`` and write it there; ``overlays="sample"`` also writes the gallery's
    overlays; ``extra``: HTML sections to end the page with (the drift). Returns the report's URI.
    ``resolve(uri) -> (fs, path)`` reads the run's input and labels."""
    start = time.perf_counter()
    data = load_run(fs, root, worst)
    palette = voc_colormap()  # every index a mask may hold (255: ignore), the run's colours first
    palette[: len(data.manifest.model.palette)] = data.manifest.model.palette
    gallery = Gallery(resolve, data.manifest.config, palette)
    tiles = [_tile(gallery, shown, opacity) for shown in data.worst]
    if overlays == "sample":
        for shown in data.worst:
            _write_overlay(fs, root, gallery, shown, opacity)
    path = storage.join(root, REPORT)
    storage.write_bytes(fs, path, render(data, tiles, opacity, extra).encode())
    log.info("report written in %.1f s: %s", time.perf_counter() - start, storage.to_uri(fs, path))
    return storage.to_uri(fs, path)


def render(data: RunData, tiles: list[Tile], opacity: float = 0.5, extra: str = "") -> str:
    """The whole page as one string."""
    m = data.manifest
    sections = [f"<h1>segpipe run <code>{_e(m.run_id)}</code></h1>", _run_facts(data)]
    if data.labeled:
        sections.append(_quality(data))
    sections.append(_predictions(data))
    sections.append(_gallery(data, tiles, opacity))
    sections.append(_errors(data))
    sections.append(extra)
    body = "\n".join(sections)
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>segpipe report {_e(m.run_id)}</title><style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _run_facts(data: RunData) -> str:
    m, c, t = data.manifest, data.manifest.counts, data.manifest.timings
    kinds = ", ".join(f"{k} {n}" for k, n in c.error_kinds.items())
    rows = [
        ("output", data.uri),
        ("input", f"{m.config['input_uri']} ({m.config.get('input', {}).get('layout', 'files')})"),
        ("labels", m.config.get("labels_uri") or "none"),
        ("model", f"{m.model.name}, {len(m.model.class_names)} classes"),
        ("from", m.model.source or f"checkpoint {m.model.checkpoint_uri}"),
        ("sha256", m.model.checkpoint_sha256),
        ("images", f"{c.images:,} ({c.errors:,} errors{': ' + kinds if kinds else ''}; {c.labeled:,} labeled)"),
        ("shards", f"{c.shards:,} ({c.shards_skipped:,} skipped: committed by an earlier attempt or increment)"),
        *([("increment", line.removeprefix("increment "))] if (line := increment_line(m)) else []),
        ("throughput", f"{t.images_per_second if t.images_per_second is not None else 'n/a'} images/s"),
        ("timings", f"plan {t.plan_seconds} s, infer {t.infer_seconds} s, reduce {t.reduce_seconds} s"),
        ("inference", ", ".join(f"{k} {v}" for k, v in m.inference.items()) or "n/a"),
        ("finished", f"{m.finished_at} (started {m.started_at})"),
    ]
    return "<h2>Run</h2>" + _table(rows, css="facts")


def _quality(data: RunData) -> str:
    x = data.metrics
    head = [
        (name, _pct(x[key]))
        for name, key in (
            ("pixel accuracy", "pixel_accuracy"),
            ("mean accuracy", "mean_accuracy"),
            ("mean IoU", "mean_iou"),
            ("frequency-weighted IoU", "frequency_weighted_iou"),
        )
    ]
    keys = ("iou", "dice", "precision", "recall")
    per_class = (
        "<table><tr><th>class</th>"
        + "".join(f"<th>{k}</th>" for k in keys)
        + "</tr>"
        + "".join(
            f"<tr><td>{_e(name)}</td>" + "".join(f"<td class='n'>{_pct(c[k])}</td>" for k in keys) + "</tr>"
            for name, c in x["per_class"].items()
        )
        + "</table>"
    )
    return (
        "<h2>Quality against the labels</h2>"
        + _table(head, css="facts")
        + per_class
        + "<div class='charts'>"
        + _chart(
            "Confusion (rows: ground truth, normalised)", charts.confusion_heatmap(data.confusion, data.class_names)
        )
        + _chart("Per class", charts.per_class_bars(x["per_class"], keys))
        + _chart(
            f"Per-image mean IoU ({len(data.image_mean_iou):,} labeled images)",
            charts.histogram(data.image_mean_iou, "mean IoU of the image"),
        )
        + "</div>"
    )


def _predictions(data: RunData) -> str:
    total = data.class_pixels.sum()
    share = data.class_pixels / total if total else np.zeros(len(data.class_pixels))
    rows = "".join(
        f"<tr><td>{_e(n)}</td><td class='n'>{s:.2%}</td><td class='n'>{p:,}</td></tr>"
        for n, s, p in zip(data.class_names, share, data.class_pixels.tolist(), strict=True)
    )
    return (
        "<h2>Predictions</h2><div class='charts'>"
        + _chart("Predicted class distribution", charts.class_share_bars({"this run": share}, data.class_names))
        + _chart(
            f"Per-image mean confidence ({len(data.image_confidence):,} images)",
            charts.histogram(data.image_confidence, "mean of the top softmax probability"),
        )
        + "</div><table><tr><th>class</th><th>share of pixels</th><th>pixels</th></tr>"
        + rows
        + "</table>"
    )


def _gallery(data: RunData, tiles: list[Tile], opacity: float) -> str:
    if not tiles:
        return "<h2>Worst images</h2><p class='muted'>No segmented image.</p>"
    legend = (
        "<p class='legend'>Prediction: the palette mask over the image at opacity "
        f"{opacity:g}. Errors:<span style='background:rgb(230,40,40)'></span>false positive (a class where "
        "the ground truth is background)<span style='background:rgb(40,110,240)'></span>false negative "
        "(a ground-truth object pixel missed or given another class)</p>"
    )
    cards = "".join(_card(tile) for tile in tiles)
    return f"<h2>Worst {len(tiles)} images, by {data.ranked_by}</h2>{legend}<div class='tiles'>{cards}</div>"


def _card(tile: Tile) -> str:
    s = tile.shown
    figures = f"confidence {s.mean_confidence:.3f}"
    if s.mean_iou is not None:
        figures = f"mean IoU {_pct(s.mean_iou)}, pixel accuracy {_pct(s.pixel_accuracy)}, " + figures
    if s.crs:
        b = s.bounds or {}
        extent = ", ".join(f"{b.get(k, float('nan')):,.1f}" for k in ("xmin", "ymin", "xmax", "ymax"))
        figures += f"<br>{_e(s.crs if len(s.crs) < 40 else s.crs[:37] + '...')}: {extent}"
    pictures = "".join(_img(tile.pictures[key], label) for key, label in _PICTURES if key in tile.pictures)
    note = f"<div class='note'>{_e(tile.note)}</div>" if tile.note else ""
    return (
        f"<div class='tile'><div class='id'>{_e(s.image_id)}</div><div class='muted'>{figures}</div>"
        f"{pictures}{note}</div>"
    )


def _img(png: bytes, label: str) -> str:
    return f"<img alt='{label}' title='{label}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _errors(data: RunData) -> str:
    if not data.errors:
        return "<h2>Errors</h2><p class='muted'>None.</p>"
    rows = "".join(
        f"<tr><td>{_e(g.reason)}</td><td>{_e(g.kind or '')}</td><td class='n'>{g.count:,}</td>"
        f"<td>{_e(', '.join(g.image_ids))}{' ...' if g.count > len(g.image_ids) else ''}</td></tr>"
        for g in data.errors
    )
    return (
        f"<h2>Errors ({sum(g.count for g in data.errors):,})</h2>"
        "<table><tr><th>reason</th><th>kind</th><th>images</th><th>ids</th></tr>" + rows + "</table>"
    )


def _tile(gallery: Gallery, shown, opacity: float) -> Tile:
    try:
        return gallery.tile(shown, opacity)
    except Exception as e:  # its mask gone since the run, say: the tile says so, the page is still written
        return Tile(shown, {}, f"cannot be drawn: {e}")


def _write_overlay(fs, root: str, gallery: Gallery, shown, opacity: float) -> None:
    try:
        jpeg = gallery.overlay(shown, opacity)
    except Exception as e:  # image or mask gone since the run
        log.warning("report: no overlay for %s: %s", shown.image_id, e)
        return
    if jpeg is not None:
        storage.write_bytes(fs, overlay_path(root, shown.image_id), jpeg)


def _chart(title: str, svg: str) -> str:
    return f"<figure class='chart'><figcaption>{_e(title)}</figcaption>{svg}</figure>"


def _table(rows: list[tuple[str, str]], css: str = "") -> str:
    cells = "".join(f"<tr><td>{_e(k)}</td><td>{_e(str(v))}</td></tr>" for k, v in rows)
    return f"<table class='{css}'>{cells}</table>"


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}%"


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)
