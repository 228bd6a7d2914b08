"""The segpipe command: clear errors before any work, exit code 2, nothing written."""

from __future__ import annotations

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
