"""report.html, overlays and run-to-run drift: built from real runs, read back as an analyst would, and opened
in a real headless Chromium (no console error, no network request; the screenshot is kept)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from browser import CHROMIUM, visit
from PIL import Image

from pipeline.cli import main
from pipeline.report.drift import psi_terms
from pipeline.report.run_data import aggregate

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def stats_table(rows: list[dict]) -> pa.Table:
    columns = ["image_id", "source_uri", "mask_uri", "label_uri", "class_pixels", "mean_confidence", "labeled"]
    columns += ["mean_iou", "pixel_accuracy", "error", "error_kind"]
    return pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])


def test_aggregates_keep_the_worst_images_class_totals_and_errors_by_reason():
    def ok(i, miou, conf, pixels):
        return dict(
            image_id=f"i{i}",
            source_uri=f"/d/i{i}",
            mask_uri=f"/m/i{i}",
            class_pixels=pixels,
            mean_confidence=conf,
            labeled=miou is not None,
            mean_iou=miou,
            pixel_accuracy=miou,
        )

    first = [ok(0, 0.9, 0.8, [5, 1]), ok(1, 0.2, 0.95, [1, 1]), ok(2, None, 0.1, [0, 4])]
    second = [ok(3, 0.5, 0.7, [2, 2]), dict(image_id="bad", error="image is truncated", error_kind="input")]
    second.append(dict(image_id="bad2", error="image is truncated", error_kind="input"))
    agg = aggregate([stats_table(first), stats_table(second)], num_classes=2, worst=2)
    assert agg.class_pixels.tolist() == [8, 8]
    assert [s.image_id for _, _, s in sorted(agg.by_iou, reverse=True)] == ["i1", "i3"]  # labeled only
    assert [s.image_id for _, _, s in sorted(agg.by_confidence, reverse=True)] == ["i2", "i3"]
    assert sorted(np.concatenate(agg.mean_iou).tolist()) == [0.2, 0.5, 0.9]
    (group,) = agg.errors.values()
    assert (group.reason, group.kind, group.count, group.image_ids) == (
        "image is truncated",
        "input",
        2,
        ["bad", "bad2"],
    )


def test_psi_is_zero_for_equal_shares_and_grows_with_the_shift():
    a = np.array([0.7, 0.2, 0.1, 0.0])
    assert psi_terms(a, a).sum() == 0
    small, large = psi_terms(a, np.array([0.6, 0.25, 0.15, 0.0])), psi_terms(a, np.array([0.2, 0.2, 0.1, 0.5]))
    assert 0 < small.sum() < large.sum() and np.isfinite(large).all()
    assert (psi_terms(a, a[::-1]) >= 0).all()  # each term is non-negative


@pytest.fixture(scope="module")
def runs(dataset, checkpoint, tmp_path_factory, ray_local, prefect_ephemeral):
    """A labeled run with the gallery's overlays, and an unlabeled one on another procedural dataset."""
    from flows.segment_dataset import segment_dataset
    from pipeline.synthetic import make_dataset

    root = tmp_path_factory.mktemp("report")
    other = make_dataset(root / "other", 6, seed=99)
    common = dict(checkpoint_uri=str(checkpoint), shard_size=8, actors=1, batch_size=4)
    outputs = {"gallery": 6, "overlays": "sample", "overlay_opacity": 0.4}
    labeled = segment_dataset(
        input_uri=str(dataset / "images"),
        labels_uri=str(dataset / "labels"),
        output_uri=str(root / "a"),
        outputs=outputs,
        **common,
    )
    unlabeled = segment_dataset(input_uri=str(other / "images"), output_uri=str(root / "b"), **common)
    return root / "a", labeled, root / "b", unlabeled


@pytest.mark.slow
def test_the_report_holds_the_runs_figures(runs):
    out, result, _, _ = runs
    page = (out / "report.html").read_text()
    metrics = result["metrics"]
    names = list(metrics["per_class"])
    for name, c in metrics["per_class"].items():  # each class's row: its IoU as metrics.json has it
        assert re.search(rf"<td>{name}</td><td class='n'>{100 * c['iou']:.2f}%</td>", page), name
    cells = set(re.findall(r'<g id="cell-(\d+)-(\d+)">', page))
    assert cells == {(str(i), str(j)) for i in range(len(names)) for j in range(len(names))}
    assert f"{100 * metrics['mean_iou']:.2f}%" in page
    assert "Worst 6 images, by mean IoU" in page and page.count("<div class='tile'>") == 6
    assert result["manifest"]["model"]["checkpoint_sha256"] in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page) and "<script" not in page  # nothing to fetch


@pytest.mark.slow
def test_the_gallerys_overlays_have_their_images_size(runs, dataset):
    out, _, _, _ = runs
    overlays = sorted((out / "overlays").rglob("*.jpg"))
    assert len(overlays) == 6
    for path in overlays:
        image_id = path.relative_to(out / "overlays").as_posix().removesuffix(".jpg")
        assert Image.open(path).size == Image.open(dataset / "images" / image_id).size


@pytest.mark.slow
def test_an_unlabeled_run_ranks_by_confidence_and_the_report_rebuilds_from_the_cli(runs):
    _, _, out, _ = runs
    page = (out / "report.html").read_text()
    assert "Worst 6 images, by confidence" in page and "Quality against the labels" not in page
    (out / "report.html").unlink()
    assert main(["report", str(out), "--gallery", "3"]) == 0
    assert "Worst 3 images, by confidence" in (out / "report.html").read_text()


@pytest.mark.slow
def test_compare_gives_zero_for_a_run_and_itself_and_a_positive_psi_for_another_mix(runs, tmp_path, capsys):
    a, _, b, _ = runs
    assert main(["compare", str(a), str(a), "--threshold", "0.01", "--json", str(tmp_path / "same.json")]) == 0
    same = json.loads((tmp_path / "same.json").read_text())
    assert same["psi"] == 0 and all(v["psi"] == 0 for v in same["per_class"].values())
    assert same["metric_deltas"]["mean_iou"] == 0
    capsys.readouterr()
    code = main(["compare", str(a), str(b), "--json", str(tmp_path / "d.json"), "--html", str(tmp_path / "d.html")])
    assert code == 0
    other = json.loads((tmp_path / "d.json").read_text())
    assert other["psi"] > 0 and other["metric_deltas"] is None  # the second run has no labels
    assert 24 - other["only_in_baseline"] == 6 - other["only_in_current"]  # the ids both runs hold
    assert "population stability index" in capsys.readouterr().out
    assert main(["compare", str(a), str(b), "--threshold", str(other["psi"] / 2)]) == 3


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is installed by `make test` (apt-get install chromium)")
def test_the_report_opens_in_a_real_browser_offline_without_errors(runs):
    out, _, _, _ = runs
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    seen = visit((out / "report.html").as_uri(), shot)
    assert seen.loaded
    fetched = [u for u in seen.requests[1:] if not u.startswith("data:")]
    assert fetched == [], fetched  # nothing but the page itself and its inline images
    assert not seen.exceptions and not [m for m in seen.console if m[0] in ("error", "warning")], seen.console
    width, height = Image.open(shot).size
    assert width == 1280 and height > 2000  # the whole page: run facts, charts, gallery, errors


def test_overlays_all_blend_every_image_with_its_mask(dataset, checkpoint, tmp_path):
    """Written by the shards, beside each mask: the image at 0.3 of the mask's colours over it."""
    from pipeline.config import load_config
    from pipeline.execution import run_inline
    from pipeline.job import finalize_job, plan_job
    from pipeline.palette import png_to_mask, voc_colormap

    out = tmp_path / "out"
    cfg = load_config(
        None,
        input_uri=str(dataset / "images"),
        output_uri=str(out),
        checkpoint_uri=str(checkpoint),
        outputs={"overlays": "all", "overlay_opacity": 0.3},
    )
    plan = plan_job(cfg)
    finalize_job(plan, run_inline(plan.cfg, plan.run_id, plan.pending), 1.0)
    masks = sorted((out / "masks").rglob("*.png"))
    overlays = sorted((out / "overlays").rglob("*.jpg"))
    assert len(overlays) == len(masks) == 24
    image_id = overlays[0].relative_to(out / "overlays").as_posix().removesuffix(".jpg")
    image = np.asarray(Image.open(dataset / "images" / image_id).convert("RGB"), np.float32)
    mask = png_to_mask((out / "masks" / f"{image_id}.png").read_bytes())
    expected = 0.7 * image + 0.3 * voc_colormap()[mask]
    got = np.asarray(Image.open(overlays[0]), np.float32)
    assert got.shape == image.shape and np.abs(got - expected).mean() < 4  # JPEG's loss only
