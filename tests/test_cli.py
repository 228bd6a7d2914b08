"""The segpipe command: clear errors before any work, exit code 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SEGPIPE = [sys.executable, "-m", "pipeline.cli"]


def segpipe(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SEGPIPE, *args], capture_output=True, text=True, cwd=cwd, env=os.environ, timeout=300)


@pytest.fixture
def base_args(dataset, checkpoint, tmp_path) -> list[str]:
    return [
        "run",
        "--input", str(dataset / "images"),
        "--labels", str(dataset / "labels"),
        "--output", str(tmp_path / "out"),
        "--checkpoint", str(checkpoint),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--shard-size", "0"], "shard_size: Input should be greater than or equal to 1"),
        (["--actors", "-1"], "actors:"),
        (["--model", "no_such_net"], "model: unknown model 'no_such_net'"),
    ],
)
def test_invalid_values_name_the_field(base_args, tmp_path, extra, needle):
    r = segpipe(*base_args, *extra)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_invalid_config_file_field_is_named(tmp_path, base_args):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("batch_size: many\nshard_sise: 3\n")
    r = segpipe(*base_args, "--config", str(cfg))
    assert r.returncode == 2
    assert "batch_size:" in r.stderr and "shard_sise: unknown field" in r.stderr
    assert str(cfg) in r.stderr


@pytest.mark.parametrize(
    ("flag", "make_value", "needle"),
    [
        ("--input", lambda p: str(p / "nowhere"), "input {} does not exist"),
        ("--labels", lambda p: str(p / "no-labels"), "labels {} does not exist"),
        ("--checkpoint", lambda p: str(p / "missing.pt"), "cannot read checkpoint {}"),
    ],
)
def test_missing_locations_stop_before_any_work(base_args, tmp_path, flag, make_value, needle):
    value = make_value(tmp_path)
    args = list(base_args)
    args[args.index(flag) + 1] = value
    r = segpipe(*args)
    assert r.returncode == 2
    assert needle.format(value) in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_unreadable_checkpoint_is_refused(base_args, tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(os.urandom(4096))
    args = list(base_args)
    args[args.index("--checkpoint") + 1] = str(bad)
    r = segpipe(*args)
    assert r.returncode == 2
    assert f"cannot read checkpoint {bad}" in r.stderr
    assert not (tmp_path / "out").exists()


def test_make_dataset_is_deterministic(tmp_path):
    for name in ("a", "b"):
        r = segpipe("make-dataset", str(tmp_path / name), "--count", "5", "--seed", "3")
        assert r.returncode == 0, r.stderr
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 10
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_a_dated_output_runs_from_the_cli_as_in_a_deployment_and_is_checked_once(
    dataset, checkpoint, tmp_path, ray_local, prefect_ephemeral, caplog
):
    """``{date}`` is filled before the check (it used to fail here while working in a deployment), and the
    checkpoint is read and hashed once: the flow's plan step reuses the command's preflight. In this process,
    on the session's Ray and Prefect (the other tests here run the command in a subprocess)."""
    import logging
    from datetime import UTC, datetime

    from pipeline.cli import main

    argv = ["run", "--input", str(dataset / "images"), "--output", str(tmp_path / "runs" / "{date}")]
    argv += ["--checkpoint", str(checkpoint), "--shard-size", "12", "--actors", "1", "--labels.format", "index_png"]
    with caplog.at_level(logging.INFO, logger="pipeline.preflight"):
        assert main(argv) == 0
    out = tmp_path / "runs" / datetime.now(UTC).strftime("%Y-%m-%d")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["images"] == 24 and manifest["config"]["output_uri"] == str(out)
    checks = [r for r in caplog.records if r.getMessage().startswith("preflight passed")]
    assert len(checks) == 1, [r.getMessage() for r in caplog.records]


def test_every_job_field_is_a_run_flag_and_sections_merge_with_the_config_file(tmp_path):
    from pipeline.cli.job_flags import config_overrides, leaf_fields
    from pipeline.cli.main import build_parser
    from pipeline.config import JobConfig

    parser = build_parser()
    for path, _ in leaf_fields(JobConfig):  # argparse exits on an unknown flag
        args = parser.parse_args(["run", "--" + ".".join(p.replace("_", "-") for p in path), "1"])
        assert config_overrides(args, JobConfig), path
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("labels: {format: index_png, reduce_zero_label: true}\nshard_size: 5\n")
    args = build_parser().parse_args(
        ["run", "--config", str(yaml_file), "--input", "in", "--output", "out", "--checkpoint", "c.pt",
         "--labels.mapping", "{3: 1}", "--actors", "auto", "--storage.secret", "123"]
    )  # fmt: skip
    overrides = config_overrides(args, JobConfig)
    assert overrides["labels"] == {"mapping": {3: 1}} and overrides["actors"] == "auto"
    assert overrides["storage"] == {"secret": "123"}  # text fields stay as written, not YAML numbers
    from pipeline.config import load_config

    cfg = load_config(str(yaml_file), **overrides)
    assert cfg.labels.reduce_zero_label and cfg.labels.mapping == {3: 1} and cfg.shard_size == 5


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["run", "train"])
def test_a_cuda_device_this_machine_lacks_is_one_line(base_args, dataset, tmp_path, command):
    if command == "run":
        args = [*base_args, "--device", "cuda"]
    else:
        args = [
            "train",
            "--data",
            str(dataset),
            "--val",
            str(dataset),
            "--out",
            str(tmp_path / "m.pt"),
            "--device",
            "cuda",
        ]
    r = segpipe(*args)
    assert r.returncode == 2
    assert (
        r.stderr.strip().splitlines()[-1]
        == "segpipe: error: device: cuda was asked for, but this machine has 0 CUDA devices"
    )
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_training_without_labeled_images_is_one_line(dataset, tmp_path):
    r = segpipe("train", "--data", str(tmp_path), "--val", str(dataset), "--out", str(tmp_path / "m.pt"))
    assert r.returncode == 2
    assert "segpipe: error: input " in r.stderr and "Traceback" not in r.stderr


def test_plan_is_a_dry_run_that_counts_and_saves_only_when_asked(base_args, dataset, tmp_path):
    args = ["plan", *base_args[1:], "--shard-size", "5"]
    dry = segpipe(*args, "--json", str(tmp_path / "dry.json"))
    assert dry.returncode == 0, dry.stderr
    assert not (tmp_path / "out").exists()  # nothing written
    figures = json.loads((tmp_path / "dry.json").read_text())
    images = sorted((dataset / "images").rglob("*.*"))
    assert figures["images"] == figures["files"] == len(images) == 24
    assert figures["bytes"] == sum(p.stat().st_size for p in images)
    assert (figures["shards"], figures["shards_committed"], figures["shards_to_run"]) == (5, 0, 5)
    assert figures["plan_uri"] is None and "not written (--save writes it" in dry.stdout
    assert "images     24 in 24 files" in dry.stdout

    saved = segpipe(*args, "--save", "--estimate", "0.2", "--json", str(tmp_path / "saved.json"))
    assert saved.returncode == 0, saved.stderr
    done = json.loads((tmp_path / "saved.json").read_text())
    assert json.loads((tmp_path / "out" / "plan" / "plan.json").read_text())["shards"] == 5
    assert done["run_id"] == figures["run_id"] and done["plan_uri"].endswith("/out/plan")
    assert done["images_per_second_per_actor"] > 0 and done["estimated_seconds"] > 0
    assert "estimate   " in saved.stdout
    assert not (tmp_path / "out" / "stats").exists() and not (tmp_path / "out" / "masks").exists()


def test_plan_refuses_a_bad_config_like_run(base_args, tmp_path):
    r = segpipe("plan", *base_args[1:], "--shard-size", "0")
    assert r.returncode == 2 and "shard_size: Input should be greater than or equal to 1" in r.stderr
