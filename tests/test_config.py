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


# Resources per actor: the fields and what they mean for a cluster (pipeline.execution.plan_actors; no Ray).


@pytest.mark.parametrize(("actors", "expected"), [("auto", "auto"), (1, 1), (3, 3), ("2", 2)])
def test_actors_a_count_or_auto(tmp_path, actors, expected):
    assert load_config(_write(tmp_path, {**BASE, "actors": actors})).actors == expected


@pytest.mark.parametrize("actors", [0, -1, 1.5, "many", True])
def test_bad_actors_named(tmp_path, actors):
    with pytest.raises(ConfigError, match=r"actors: must be a whole number >= 1 or auto"):
        load_config(_write(tmp_path, {**BASE, "actors": actors}))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("gpus_per_actor", 0, "gpus_per_actor: Input should be greater than 0"),
        ("gpus_per_actor", 9, "gpus_per_actor: Input should be less than or equal to 8"),
        ("gpus_per_actor", 1.5, "gpus_per_actor: above 1 it must be a whole number"),
        ("cpus_per_actor", 0, "cpus_per_actor: Input should be greater than 0"),
        ("cpus_per_actor", -2, "cpus_per_actor: Input should be greater than 0"),
    ],
)
def test_bad_resources_per_actor_named(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, {**BASE, field: value}))


def test_gpus_per_actor_needs_a_gpu_device(tmp_path):
    with pytest.raises(ConfigError, match="gpus_per_actor: set, but device is cpu"):
        load_config(_write(tmp_path, {**BASE, "gpus_per_actor": 1, "device": "cpu"}))
    cfg = load_config(_write(tmp_path, {**BASE, "gpus_per_actor": 0.5, "cpus_per_actor": 0.5}))
    assert (cfg.gpus_per_actor, cfg.cpus_per_actor) == (0.5, 0.5)


@pytest.mark.parametrize(
    ("fields", "resources", "pending", "expected"),
    [
        ({}, {"CPU": 16}, 100, (1, 16, 0)),  # today's rule: one actor, every CPU
        ({"actors": 4}, {"CPU": 16, "GPU": 4}, 100, (4, 4, 1)),  # a GPU for each actor
        ({"actors": 4}, {"CPU": 16, "GPU": 2}, 100, (4, 4, 0.5)),  # not enough GPUs for each: shared
        ({"actors": 2}, {"CPU": 16, "GPU": 1}, 100, (2, 8, 0.5)),
        ({"actors": 3}, {"CPU": 16, "GPU": 2}, 100, (3, 5, 0.5)),  # shares that pack: 2 per GPU, not 1.5
        ({"actors": 2, "device": "cpu"}, {"CPU": 16, "GPU": 1}, 100, (2, 8, 0)),
        ({"actors": 4, "device": "cpu"}, {"CPU": 16, "GPU": 4}, 100, (4, 4, 0)),
        ({"actors": 4}, {"CPU": 16}, 3, (3, 5, 0)),  # no more actors than shards
        ({"actors": "auto"}, {"CPU": 16, "GPU": 4}, 100, (4, 4, 1)),  # one per GPU
        ({"actors": "auto", "gpus_per_actor": 0.5}, {"CPU": 16, "GPU": 4}, 100, (8, 2, 0.5)),
        ({"actors": "auto", "gpus_per_actor": 0.5, "cpus_per_actor": 3}, {"CPU": 64, "GPU": 3}, 100, (6, 3, 0.5)),
        ({"actors": "auto"}, {"CPU": 6}, 100, (6, 1, 0)),  # no GPU: one per CPU
        ({"actors": "auto", "cpus_per_actor": 4}, {"CPU": 18}, 100, (4, 4, 0)),
        ({"actors": "auto", "cpus_per_actor": 4}, {"CPU": 18}, 2, (2, 4, 0)),
        ({"actors": "auto", "cpus_per_actor": 8}, {"CPU": 2}, 100, (1, 8, 0)),  # at least one
        ({"actors": 2, "cpus_per_actor": 0.5}, {"CPU": 2}, 100, (2, 0.5, 0)),
    ],
)
def test_actors_and_their_resources_from_the_cluster(fields, resources, pending, expected):
    from pipeline.execution import plan_actors

    plan = plan_actors(JobConfig(**BASE, **fields), resources, pending)
    assert (plan.actors, plan.cpus, plan.gpus) == expected
    assert plan.torch_threads == max(1, int(expected[1]))


@pytest.mark.parametrize(
    ("inference", "field"),
    [
        ({"mode": "tiles"}, "inference.mode"),
        ({"tile": [512]}, "inference.tile"),
        ({"tile": [4, 512]}, "inference.tile.0"),
        ({"overlap": 1.0}, "inference.overlap"),
        ({"blend": "max"}, "inference.blend"),
        ({"tta": {"flips": ["diagonal"]}}, "inference.tta.flips.0"),
        ({"tta": {"scales": [1.0, 1.0]}}, "inference.tta.scales"),
        ({"tta": {"scales": []}}, "inference.tta.scales"),
        ({"stride": 4}, "inference.stride"),
    ],
)
def test_a_bad_inference_setting_names_its_field(tmp_path, inference, field):
    with pytest.raises(ConfigError) as ei:
        load_config(_write(tmp_path, BASE), inference=inference)
    assert f"  {field}: " in str(ei.value)


def test_inference_settings_merge_with_the_file_and_a_single_tile_number_is_square(tmp_path):
    path = _write(tmp_path, BASE | {"inference": {"mode": "slide", "overlap": 0.5}, "max_image_pixels": 10**9})
    cfg = load_config(path, inference={"tile": 256, "tta": {"flips": ["horizontal"]}})
    assert (cfg.inference.mode, cfg.inference.overlap, cfg.inference.tile) == ("slide", 0.5, (256, 256))
    assert cfg.inference.tta.flips == ["horizontal"] and cfg.inference.tta.scales == [1.0]
    assert cfg.max_image_pixels == 10**9
    with pytest.raises(ConfigError, match="max_image_pixels"):
        load_config(path, max_image_pixels=0)
