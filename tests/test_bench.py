"""segpipe bench --quick: every path runs and the report has every key with sane values (no speed thresholds)."""

from __future__ import annotations

import json

import pytest

from pipeline.bench.memory import tree_rss_bytes
from pipeline.cli import main

pytestmark = pytest.mark.slow


def test_quick_bench_reports_every_path_and_ratio(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--model", "unet_tiny", "--actors", "1", "--device", "cpu", "--work", str(tmp_path)]
    assert main([*argv, "--paths", "ceiling,naive,raydata,segpipe,core", "--json", str(out)]) == 0
    report = json.loads(out.read_text())

    assert set(report["paths"]) == {"ceiling", "naive", "raydata", "segpipe", "core"}
    for name, path in report["paths"].items():
        assert path["images"] >= 32, name
        assert path["images_per_s"] > 0 and path["seconds"] > 0, name
        assert 50 < path["peak_rss_mb"] < 16_000, name
    assert set(report["ratios"]) == {"segpipe_over_ceiling", "segpipe_over_naive", "segpipe_over_raydata"}
    seg = report["paths"]["segpipe"]["images_per_s"]
    for other in ("ceiling", "naive", "raydata"):
        expected = seg / report["paths"][other]["images_per_s"]
        assert report["ratios"][f"segpipe_over_{other}"] == pytest.approx(expected, rel=1e-2)
    assert (report["model"], report["image_size"], report["batch_size"], report["precision"]) == (
        "unet_tiny",
        256,
        4,
        "fp32",
    )
    assert report["machine"]["cpus"] >= 1 and report["versions"]["torch"]
    for name in ("segpipe", "core"):  # the job with Ray and without
        timings = report["paths"][name]["timings"]  # from the run's manifest
        assert timings["infer_seconds"] > 0 and timings["plan_seconds"] > 0, name
        assert "gpu_peak_mb" not in report["paths"][name]  # no CUDA used
    # The Ray paths' memory includes their worker processes: more than the driver alone holds.
    assert report["paths"]["segpipe"]["peak_rss_mb"] > report["paths"]["ceiling"]["peak_rss_mb"]


@pytest.mark.s3
def test_quick_datapath_bench_reports_steps_host_rates_and_the_job(tmp_path):
    from pipeline.bench.datapath import HOST_STEPS, STEPS

    out = tmp_path / "datapath.json"
    # One client, not the default s3fs: the paths of another client are named <path>:<client>.
    argv = ["bench", "--datapath", "--quick", "--storage-client", "obstore", "--work", str(tmp_path)]
    assert main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())

    assert report["model"] == "pointwise" and set(report["datapath"]) == {"obstore"}
    paths = {name.removesuffix(":obstore"): path for name, path in report["paths"].items()}
    assert len(paths) == 3 and all(name.endswith(":obstore") for name in report["paths"])
    limit = paths["limit"]
    assert limit["images"] == 32 and tuple(limit["steps_ms"]) == tuple(limit["steps_cpu_ms"]) == STEPS
    assert all(limit["steps_ms"][k] > 0 for k in STEPS) and all(limit["steps_cpu_ms"][k] >= 0 for k in STEPS)
    assert limit["seconds"] == pytest.approx(sum(limit["steps_ms"].values()) * 32 / 1000, rel=0.01)
    cpus = report["machine"]["cpus"]
    assert set(paths["host"]["rates"]) == {"one_thread", f"{cpus}_threads", f"{cpus}_processes"}
    assert all(r > 0 for r in paths["host"]["rates"].values())
    assert paths["segpipe"]["images"] == 32
    s = report["datapath"]["obstore"]
    assert s["limit_images_per_s_per_core"] == pytest.approx(1000 / sum(limit["steps_ms"].values()), rel=0.01)
    assert s["host_ms_per_image"] == pytest.approx(sum(limit["steps_ms"][k] for k in HOST_STEPS), rel=0.01)
    assert s["job_over_limit"] == pytest.approx(
        s["job_images_per_s_per_core"] / s["limit_images_per_s_per_core"], rel=0.01
    )
    assert 0 <= s["host_serial_share"] <= 1 and s["host_threads_over_processes"] > 0


def test_ceiling_splits_work_across_processes_and_repeat_keeps_every_round(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--model", "unet_tiny", "--actors", "2", "--device", "cpu", "--work", str(tmp_path)]
    assert main([*argv, "--paths", "ceiling", "--repeat", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    ceiling = report["paths"]["ceiling"]
    assert report["rounds"] == 2 and len(ceiling["runs"]) == 2
    assert ceiling["images_per_s"] == max(ceiling["runs"])  # the fastest round is the one reported
    assert ceiling["images"] == 32  # both processes' shares: 8 batches of 4, split 4 and 4
    assert report["ratios"] == {}  # no segpipe path, no ratio


def test_tree_rss_counts_children(tmp_path):
    import os
    import subprocess
    import sys

    alone = tree_rss_bytes(os.getpid())
    code = "import time; x = b'1' * (200 * 2**20); time.sleep(30)"  # written bytes: resident, unlike calloc'd zeros
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        import time

        deadline = time.monotonic() + 20
        while tree_rss_bytes(os.getpid()) < alone + 150 * 2**20:
            assert time.monotonic() < deadline, "the child's 200 MB never showed up"
            time.sleep(0.1)
    finally:
        child.kill()
        child.wait()


@pytest.mark.s3
def test_overheads_count_every_object_and_part(tmp_path):
    from pipeline.bench.overheads import measure

    report = measure(tmp_path, sizes=(40, 80), rows_per_part=2)
    assert [p["n"] for p in report["planning"]["objects"]] == [40, 80]
    assert [p["shards"] for p in report["planning"]["objects"]] == [1, 1]  # 256 images a shard
    assert [p["images"] for p in report["reduce"]["stats_parts"]] == [80, 160]
    for kind in ("planning", "reduce", "reduce_footers"):
        assert report[kind]["seconds_per_10k"] > 0 and report[kind]["max_relative_departure"] >= 0


def test_large_workload_reports_throughput_and_memory_per_size(tmp_path):
    from pipeline.bench.large import format_table, measure

    # One memory size: each measurement is a fresh process that imports torch (2-3 s here), the jobs' twice.
    report = measure(tmp_path, size=300, sides=(200,), tile=64, device="cpu", repeat=1)

    assert report["inference"] == {"mode": "slide", "tile": [64, 64], "overlap": 0.25, "blend": "gaussian"}
    assert (report["batch_size"], report["device_type"]) == (1, "cpu")
    assert report["torch_threads"] >= 1 and report["versions"]["torch"]
    t = report["throughput"]
    assert t["windows"] == 36  # starts 0, 48, ..., 236 on both axes: 6 x 6
    for name in ("forward", "slide"):
        rates = t["paths"][name]["windows_per_s"]
        assert 0 < rates["min"] <= rates["median"] <= rates["max"], name
        assert len(t["paths"][name]["runs"]) == 1, name
    assert t["slide_over_forward"] == pytest.approx(
        t["paths"]["slide"]["windows_per_s"]["median"] / t["paths"]["forward"]["windows_per_s"]["median"], rel=1e-2
    )
    sizes = report["memory"]["sizes"]
    assert [(r["side"], r["megapixels"]) for r in sizes] == [(200, 0.04)]
    (r,) = sizes
    assert (r["image_mb"], r["mask_mb"]) == (round(3 * 200**2 / 2**20, 1), round(200**2 / 2**20, 1))
    assert r["band_mb"] == round(4 * 22 * 64 * 200 / 2**20, 1)  # 21 classes and the weight, fp32, 64 rows
    for kind in ("decode", "job"):
        for key in ("peak_rss_mb", "vm_hwm_mb", "ru_maxrss_mb", "seconds"):
            spread = r[kind][key]
            assert 0 < spread["min"] <= spread["median"] <= spread["max"], (kind, key)
    assert r["job"]["vm_hwm_mb"]["median"] > r["decode"]["vm_hwm_mb"]["median"]  # the model, the windows
    assert r["job"]["peak_rss_mb"]["ratio_to_first"] == 1.0
    assert "slide / forward" in format_table(report)


def test_scale_plans_a_manifest_and_reduces_every_summary(tmp_path):
    """Each half as ``measure`` runs it in a fresh process, here in this one (torch is imported already)."""
    from pipeline.bench.scale import plan_once, reduce_once, write_manifest

    manifest = write_manifest(tmp_path / "manifest.parquet", 3000)
    plan = plan_once(str(manifest), str(tmp_path / "plan-out"))
    assert (plan["images"], plan["shards"], plan["plan_parts"]) == (3000, 47, 1)  # 64 images a shard
    assert plan["peak_rss_mb"] >= plan["rss_before_plan_mb"] > 0 and plan["seconds"] > 0 and plan["rerun_seconds"] > 0
    reduce = reduce_once(700, str(tmp_path / "reduce-out"))
    assert reduce["fold_seconds"] >= 0 and reduce["finalize_seconds"] > 0 and reduce["manifest_mb"] >= 0
    assert json.loads((tmp_path / "reduce-out" / "manifest.json").read_text())["counts"]["images"] == 700 * 64
