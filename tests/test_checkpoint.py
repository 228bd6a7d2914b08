"""Checkpoints: round trip (torch and safetensors), refusal of code-running pickles, sha256, mismatched models."""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest
import safetensors.torch
import torch

from pipeline.errors import CheckpointError, SegpipeError
from pipeline.models import get_model
from pipeline.models.checkpoint import FORMAT, ModelMeta, load_checkpoint, save_checkpoint, sha256_hex


def _model(num_classes=3, width=4, seed=0):
    torch.manual_seed(seed)
    model = get_model("unet_tiny", num_classes=num_classes, width=width)
    # give the BatchNorm buffers non-default values so they must travel too
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return model.eval()


META = ModelMeta(
    arch="unet_tiny",
    class_names=("bg", "cat", "dog"),
    input_policy="resize",
    stride=16,
    size=(32, 48),
    arch_kwargs={"width": 4},
    palette=((1, 2, 3), (4, 5, 6)),
)


def test_round_trip_identical_outputs():
    model = _model()
    data = save_checkpoint(model, META, extra={"epochs": 3})
    loaded, meta = load_checkpoint(data, "mem://ckpt")
    assert not loaded.training
    assert meta == META
    assert meta.num_classes == 3
    assert meta.size == (32, 48)
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(x)
        b = loaded(x)
    assert torch.equal(a, b)
    # a differently seeded model gives different outputs, so the comparison above means something
    with torch.no_grad():
        assert not torch.equal(_model(seed=1)(x), a)
    pal = meta.palette_array()
    assert tuple(pal[0]) == (1, 2, 3) and tuple(pal[1]) == (4, 5, 6)
    assert tuple(pal[2]) == (0, 128, 0)


def test_save_is_deterministic_and_hashable():
    model = _model()
    a = save_checkpoint(model, META)
    assert sha256_hex(a) == sha256_hex(a)
    assert len(sha256_hex(a)) == 64
    loaded, _ = load_checkpoint(a, "x")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_malicious_pickle_refused(tmp_path):
    # control: the payload really runs code when unpickled without restriction
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control)))
    assert control.exists()

    pwned = tmp_path / "pwned"
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(pickle.dumps(_Evil(pwned)), "evil.pt")
    assert not pwned.exists()


def test_torch_saved_malicious_object_refused(tmp_path):
    pwned = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "meta": {"arch": "unet_tiny"}, "payload": _Evil(pwned)}, buf)
    assert not pwned.exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(buf.getvalue(), "evil.pt")
    assert not pwned.exists()


def test_arch_mismatch_names_both():
    data = save_checkpoint(_model(), META)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(data, "ck.pt", expect_arch="other")
    msg = str(ei.value)
    assert "'unet_tiny'" in msg
    assert "'other'" in msg
    assert "ck.pt" in msg
    load_checkpoint(data, "ck.pt", expect_arch="unet_tiny")  # the matching name is accepted


def test_shape_mismatch_refused():
    model = _model(num_classes=5)
    meta = ModelMeta(arch="unet_tiny", class_names=("a", "b", "c"), arch_kwargs={"width": 4})
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(save_checkpoint(model, meta), "ck.pt")


def test_random_bytes_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(CheckpointError):
        load_checkpoint(rng.integers(0, 256, 2048).astype(np.uint8).tobytes(), "junk.pt")


def test_truncated_checkpoint_refused():
    data = save_checkpoint(_model(), META)
    for cut in (len(data) // 2, 10, 1):
        with pytest.raises(CheckpointError, match="cannot read checkpoint"):
            load_checkpoint(data[:cut], "cut.pt")


@pytest.mark.parametrize("payload", [[1, 2, 3], {"format": "other/1"}, {"state_dict": {}}])
def test_wrong_format_refused(payload):
    buf = io.BytesIO()
    torch.save(payload, buf)
    with pytest.raises(CheckpointError, match=FORMAT):
        load_checkpoint(buf.getvalue(), "x.pt")


def test_checkpoint_error_is_segpipe_error():
    assert issubclass(CheckpointError, SegpipeError)


# --- known gaps: load_checkpoint lets these escape as non-CheckpointError exceptions -------------


def test_unknown_arch_in_meta_is_checkpoint_error():
    data = save_checkpoint(_model(), ModelMeta(arch="nosuch", class_names=("a", "b", "c")))
    with pytest.raises(CheckpointError):
        load_checkpoint(data, "ck.pt")


def test_bad_arch_kwargs_is_checkpoint_error():
    data = save_checkpoint(_model(), ModelMeta(arch="unet_tiny", class_names=("a", "b", "c"), arch_kwargs={"depth": 2}))
    with pytest.raises(CheckpointError):
        load_checkpoint(data, "ck.pt")


def test_missing_meta_is_checkpoint_error():
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "state_dict": {}}, buf)
    with pytest.raises(CheckpointError):
        load_checkpoint(buf.getvalue(), "ck.pt")


def test_empty_bytes_is_checkpoint_error():
    with pytest.raises(CheckpointError):
        load_checkpoint(b"", "empty.pt")


# --- safetensors, sha256, expected architecture and class count -------------------------------------------


def test_safetensors_round_trip():
    model = _model()
    data = save_checkpoint(model, META, extra={"epochs": 3}, format="safetensors")
    tensors = safetensors.torch.load(data)  # a plain safetensors file: any safetensors reader opens it
    assert tensors.keys() == model.state_dict().keys()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert json.loads(header["__metadata__"]["segpipe.meta"])["arch"] == "unet_tiny"
    assert json.loads(header["__metadata__"]["segpipe.extra"]) == {"epochs": 3}
    loaded, meta = load_checkpoint(data, "ck.safetensors", expect_arch="unet_tiny", expect_classes=3)
    assert meta == META
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_safetensors_without_segpipe_meta_refused_saying_how_to_import_them():
    data = safetensors.torch.save({k: v.contiguous() for k, v in _model().state_dict().items()})
    with pytest.raises(CheckpointError, match="is a plain state dict, without segpipe's metadata: .*import-weights"):
        load_checkpoint(data, "foreign.safetensors")


def test_safetensors_with_garbled_meta_refused():
    data = safetensors.torch.save({"w": torch.zeros(2)}, metadata={"segpipe.meta": "{not json"})
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(data, "bad.safetensors")


def test_unknown_save_format_refused():
    with pytest.raises(ValueError, match="'onnx'"):
        save_checkpoint(_model(), META, format="onnx")


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_sha256_checked_before_parsing(fmt):
    data = save_checkpoint(_model(), META, format=fmt)
    good = sha256_hex(data)
    load_checkpoint(data, "ck", sha256=good)
    load_checkpoint(data, "ck", sha256=good.upper())
    bad = "0" * 64
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(data, "ck", sha256=bad)
    assert good in str(ei.value) and bad in str(ei.value) and "ck" in str(ei.value)
    # a mismatch is reported as such even for bytes that would not parse
    with pytest.raises(CheckpointError, match=f"has sha256 {sha256_hex(b'junk')}"):
        load_checkpoint(b"junk", "ck", sha256=bad)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_wrong_architecture_or_class_count_names_both(fmt):
    data = save_checkpoint(_model(), META, format=fmt)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(data, "ck.pt", expect_arch="fcn8s", expect_classes=21)
    assert str(ei.value) == (
        "checkpoint ck.pt is for 'unet_tiny' with 3 classes, but the config asks for 'fcn8s' with 21 classes"
    )
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(data, "ck.pt", expect_classes=5)
    assert str(ei.value) == (
        "checkpoint ck.pt is for 'unet_tiny' with 3 classes, but the config asks for 'unet_tiny' with 5 classes"
    )
    load_checkpoint(data, "ck.pt", expect_arch="unet_tiny", expect_classes=3)
