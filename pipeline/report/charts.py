"""The report's charts, drawn with matplotlib (Agg) and returned as SVG text to embed in the page: no file,
no script, no font or anything else fetched when the page opens."""

from __future__ import annotations

import io

import numpy as np

HEATMAP_CELL_TEXT = 25  # up to this many classes, each heatmap cell shows its share and count


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    _pyplot().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # the XML prolog and doctype do not belong inside HTML


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=80)
    _pyplot().close(fig)
    return buf.getvalue()


def confusion_heatmap(confusion: np.ndarray, names: list[str], png: bool = False) -> str | bytes:
    """Rows (ground truth) normalised to 1; each cell's share and pixel count written in it for few classes,
    and in its tooltip always (SVG; ``png=True``: the picture alone, as PNG bytes)."""
    plt = _pyplot()
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape, np.float64), where=rows > 0)
    n = len(names)
    side = min(12.0, 1.6 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the ground-truth class's pixels")
    for i in range(n):
        for j in range(n):
            cell = plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, linewidth=0)
            cell.set_gid(f"cell-{i}-{j}")
            ax.add_patch(cell)
            if n <= HEATMAP_CELL_TEXT:
                colour = "white" if share[i, j] > 0.6 else "black"
                ax.text(
                    j,
                    i,
                    f"{share[i, j]:.2f}\n{_count(confusion[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=colour,
                )
    if png:
        return _png(fig)
    svg = _svg(fig)
    for i in range(n):  # tooltips: SVG <title> elements on the cells
        for j in range(n):
            tip = f"{names[i]} → {names[j]}: {confusion[i, j]:,} pixels ({share[i, j]:.2%} of {names[i]})"
            svg = svg.replace(f'<g id="cell-{i}-{j}">', f'<g id="cell-{i}-{j}"><title>{_escape(tip)}</title>', 1)
    return svg


def per_class_bars(per_class: dict[str, dict], keys=("iou", "dice", "precision", "recall")) -> str:
    plt = _pyplot()
    names = list(per_class)
    values = np.array([[np.nan if per_class[c][k] is None else per_class[c][k] for k in keys] for c in names])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) * len(keys) / 2), 3.6))
    width = 0.8 / len(keys)
    x = np.arange(len(names))
    for k, key in enumerate(keys):
        ax.bar(x + (k - (len(keys) - 1) / 2) * width, np.nan_to_num(values[:, k]), width, label=key)
    ax.set_xticks(x, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax.set_ylim(0, 1)
    ax.legend(ncols=len(keys), loc="upper center", bbox_to_anchor=(0.5, 1.15), frameon=False)
    return _svg(fig)


def histogram(values: np.ndarray, xlabel: str, bins: int = 20, value_range=(0.0, 1.0)) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 2.8))
    ax.hist(values, bins=bins, range=value_range, color="#4c72b0")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    return _svg(fig)


def class_share_bars(shares: dict[str, np.ndarray], names: list[str]) -> str:
    """Horizontal bars: each class's share of the predicted pixels, one bar per run (one run, or two compared)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 0.6 + 0.32 * len(names) * max(1, len(shares))))
    y = np.arange(len(names))
    height = 0.8 / len(shares)
    for k, (label, share) in enumerate(shares.items()):
        ax.barh(y + (k - (len(shares) - 1) / 2) * height, share, height, label=label)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("share of predicted pixels")
    if len(shares) > 1:
        ax.legend(frameon=False)
    return _svg(fig)


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
