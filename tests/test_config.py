"""load_config: YAML plus overrides, path normalisation, and ConfigError messages naming the field."""

from __future__ import annotations

import os

import pytest
import yaml
from pydantic import ValidationError

from pipeline.config import JobConfig, load_config
from pipeline.errors import ConfigError, SegpipeError


def _write(tmp_path, data, name="job.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


BASE = {
    "input_uri": "images",
    "output_uri": "s3://bucket/out/",
    "checkpoint_uri": "model.pt",
    "shard_size": 10,
    "batch_size": 4,
}


def test_yaml_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, BASE)
    cfg = load_config(path, shard_size=5, batch_size=None, device=None, labels_uri="labs")
    assert isinstance(cfg, JobConfig)
    assert cfg.shard_size == 5  # override wins
    assert cfg.batch_size == 4  # None override ignored, YAML value kept
    assert cfg.device == "auto"  # default
    assert cfg.input_uri == os.path.join(str(tmp_path), "images")
    assert cfg.labels_uri == os.path.join(str(tmp_path), "labs")
    assert cfg.checkpoint_uri == os.path.join(str(tmp_path), "model.pt")
    assert os.path.isabs(cfg.input_uri)
    assert cfg.output_uri == "s3://bucket/out/"  # URIs are left alone


def test_overrides_only(tmp_path):
    cfg = load_config(
        None,
        input_uri=str(tmp_path / "in"),
        output_uri="file:///data/out",
        checkpoint_uri="s3://b/m.pt",
    )
    assert cfg.input_uri == str(tmp_path / "in")
    assert cfg.output_uri == "file:///data/out"
    assert cfg.checkpoint_uri == "s3://b/m.pt"
    assert cfg.labels_uri is None


def test_config_is_frozen(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    with pytest.raises(ValidationError):
        cfg.shard_size = 3  # type: ignore[misc]


def test_shard_size_zero(tmp_path):
    with pytest.raises(ConfigError, match="shard_size"):
        load_config(_write(tmp_path, BASE), shard_size=0)


def test_unknown_field(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(_write(tmp_path, {**BASE, "shard_sise": 3}))
    msg = str(ei.value)
    assert "shard_sise" in msg
    assert "unknown field" in msg
    assert str(tmp_path / "job.yaml") in msg  # the source is named


def test_unknown_model(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(_write(tmp_path, BASE), model="resnet_huge")
    msg = str(ei.value)
    assert "model" in msg
    assert "unknown model" in msg
    assert "unet_tiny" in msg  # lists what is registered


def test_known_model(tmp_path):
    assert load_config(_write(tmp_path, BASE), model="unet_tiny").model == "unet_tiny"


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope" / "job.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(missing)
    assert str(missing) in str(ei.value)


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU"])
def test_bad_device(tmp_path, device):
    with pytest.raises(ConfigError, match="device"):
        load_config(_write(tmp_path, BASE), device=device)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_good_device(tmp_path, device):
    assert load_config(_write(tmp_path, BASE), device=device).device == device


def test_missing_required_field(tmp_path):
    data = dict(BASE)
    del data["checkpoint_uri"]
    with pytest.raises(ConfigError, match="checkpoint_uri"):
        load_config(_write(tmp_path, data))


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(ConfigError, match="YAML"):
        load_config(_write(tmp_path, "a: [unclosed\n", "bad.yaml"))


def test_empty_uri_rejected(tmp_path):
    with pytest.raises(ConfigError, match="input_uri"):
        load_config(_write(tmp_path, BASE), input_uri="   ")


def test_config_error_is_segpipe_and_value_error():
    assert issubclass(ConfigError, SegpipeError)
    assert issubclass(ConfigError, ValueError)
