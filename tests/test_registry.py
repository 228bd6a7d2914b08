"""The model registry, its plugins (entry points; the test plugin segpipe-faults) and unet_tiny's any-size
forward pass."""

from __future__ import annotations

import builtins
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.models import get_model, list_models, register_model
from pipeline.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from pipeline.models.registry import MODELS
from pipeline.models.unet_tiny import UNetTiny
from pipeline.registry import Registry

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "tests" / "plugins"


def test_list_models():
    models = list_models()
    assert "unet_tiny" in models
    assert models == sorted(models)


def test_unknown_model_lists_registered():
    with pytest.raises(ValueError) as ei:
        get_model("nope")
    msg = str(ei.value)
    assert "'nope'" in msg
    assert "unet_tiny" in msg


def test_duplicate_registration_refused_and_original_kept():
    def impostor(**kwargs):
        return torch.nn.Identity()

    with pytest.raises(ValueError, match="unet_tiny"):
        register_model("unet_tiny")(impostor)
    assert isinstance(get_model("unet_tiny", num_classes=2, width=4), UNetTiny)


def test_get_model_passes_config():
    m = get_model("unet_tiny", num_classes=7, width=4)
    assert m.head.out_channels == 7
    assert m.head.in_channels == 4


@pytest.mark.parametrize("shape", [(1, 3, 97, 131), (2, 3, 64, 80), (1, 3, 1, 1), (1, 3, 17, 5)])
def test_unet_tiny_any_size(shape):
    torch.manual_seed(0)
    model = get_model("unet_tiny", num_classes=4, width=4).eval()
    with torch.no_grad():
        out = model(torch.randn(*shape))
    n, _, h, w = shape
    assert out.shape == (n, 4, h, w)
    assert torch.isfinite(out).all()


def test_unet_tiny_default_classes():
    model = get_model("unet_tiny", width=4).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5, 32, 32)


# The test plugin segpipe-faults (tests/plugins, on sys.path by conftest): models from entry points.

MAGENTA = (255, 0, 255)


def _normalised(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W], normalised with ImageNet's mean and std as the pipeline does."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (rgb.permute(0, 3, 1, 2).float() / 255 - mean) / std


def _magenta(n: int = 1, h: int = 8, w: int = 8) -> torch.Tensor:
    return _normalised(torch.tensor(MAGENTA, dtype=torch.uint8).expand(n, h, w, 3))


def test_plugin_model_is_listed_and_built():
    assert "faults_1x1" in list_models()
    assert MODELS.origin("faults_1x1") == "segpipe-faults"
    assert MODELS.origin("unet_tiny") == "built-in"
    model = get_model("faults_1x1", num_classes=3)
    assert model.stride == 1
    with torch.no_grad():
        assert model(torch.randn(2, 3, 5, 7)).shape == (2, 3, 5, 7)


@pytest.mark.parametrize("shape", [(1, 3, 97, 131), (2, 3, 64, 80), (1, 3, 1, 17)])
def test_plugin_model_is_exactly_flip_equivariant(shape):
    torch.manual_seed(0)
    model = get_model("faults_1x1", num_classes=4).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(model(x.flip(-1)), model(x).flip(-1))


def test_plugin_model_raises_on_poison_only():
    torch.manual_seed(0)
    model = get_model("faults_1x1", num_classes=2, on_poison="raise").eval()
    noise = _normalised(torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8))
    with torch.no_grad():
        model(noise)
        with pytest.raises(RuntimeError, match="poisoned input"):
            model(_magenta())
        with pytest.raises(RuntimeError, match="poisoned input"):
            model(torch.cat([noise, _magenta(1, 16, 16)]))  # one poisoned sample poisons the batch
        half = _magenta(1, 16, 16)
        half[..., :8] = noise[:1, ..., :8]
        model(half)  # exactly half magenta: not "more than half"


def test_plugin_model_kill_really_kills():
    code = f"""
import torch
from pipeline.models import get_model
x = torch.tensor({MAGENTA}, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 8, 8) / 255
x = (x - torch.tensor({IMAGENET_MEAN}).view(1, 3, 1, 1)) / torch.tensor({IMAGENET_STD}).view(1, 3, 1, 1)
get_model("faults_1x1", num_classes=2, on_poison="kill")(x)
print("survived")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), str(REPO)])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "survived" not in r.stdout


def _dist(site: Path, name: str, group: str, entry_points: dict[str, str]) -> None:
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = [f"[{group}]", *(f"{k} = {v}" for k, v in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def test_a_broken_plugin_is_logged_and_skipped(tmp_path, monkeypatch, caplog):
    group = "segpipe.test.plugins"
    (tmp_path / "good_plugin.py").write_text("def good():\n    return 'good'\n")
    (tmp_path / "bad_plugin.py").write_text("raise ImportError('this plugin is broken')\n")
    _dist(tmp_path, "good-dist", group, {"good": "good_plugin:good"})
    _dist(tmp_path, "bad-dist", group, {"bad": "bad_plugin:bad", "builtin": "good_plugin:good"})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("thing", "things", entry_point_group=group)
    builtin = registry.register("builtin")(lambda: "built-in")

    with caplog.at_level(logging.WARNING, logger="pipeline.registry"):
        assert registry.names() == ["builtin", "good"]
    assert registry.get("good")() == "good"
    assert registry.origin("good") == "good-dist"
    assert registry.get("builtin") is builtin and registry.origin("builtin") == "built-in"

    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "'bad' (bad_plugin:bad from bad-dist)" in messages and "this plugin is broken" in messages
    assert "'builtin' (good_plugin:good from bad-dist)" in messages and "taken by a built-in" in messages
    assert set(registry.failures) == {"bad", "builtin"}
    assert "ImportError: this plugin is broken" in registry.failures["bad"]

    caplog.clear()
    with pytest.raises(ValueError, match="unknown thing 'nope'; registered things: builtin, good"):
        registry.get("nope")
    assert not caplog.records  # loaded once


def test_plugins_are_loaded_lazily_and_once(tmp_path, monkeypatch):
    group = "segpipe.test.lazy"
    (tmp_path / "counted_plugin.py").write_text("import builtins\nbuiltins.SEGPIPE_LOADS += 1\nx = 1\n")
    _dist(tmp_path, "counted", group, {"x": "counted_plugin:x"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(builtins, "SEGPIPE_LOADS", 0, raising=False)
    registry = Registry("thing", "things", entry_point_group=group)
    registry.add("a", 0)
    assert registry.get("a") == 0 and builtins.SEGPIPE_LOADS == 0  # a hit loads nothing
    assert registry.get("x") == 1 and builtins.SEGPIPE_LOADS == 1
    registry.names()
    assert builtins.SEGPIPE_LOADS == 1


PLUGIN_PACKAGE = {
    "pyproject.toml": """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "segpipe-demo-plugin"
version = "0.1"

[project.entry-points."segpipe.models"]
demo_conv = "segpipe_demo_plugin:demo_conv"
demo_broken = "segpipe_demo_plugin_gone:net"
""",
    "segpipe_demo_plugin.py": """
from torch import nn

def demo_conv(num_classes=2):
    return nn.Conv2d(3, num_classes, 1)
""",
}


def _segpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_plugin_package_installed_into_the_venv_registers_its_models(tmp_path):
    """A real package, pip-installed into this venv and removed again: its model is listed with its package and
    makes checkpoints; its broken entry point is reported by name and breaks neither it nor the built-ins."""
    for name, text in PLUGIN_PACKAGE.items():
        (tmp_path / name).write_text(text.lstrip())
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    install = pip + ["install", "--no-build-isolation", "--no-deps", "--no-index", str(tmp_path)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    try:
        listed = _segpipe("models", "--list")
        rows = {
            line.split("|")[1].strip(" `"): line.split("|")[2].strip()
            for line in listed.stdout.splitlines()
            if line.startswith("| `")
        }
        assert rows["demo_conv"] == "segpipe-demo-plugin", listed.stdout
        assert rows["faults_1x1"] == "segpipe-faults" and rows["unet_tiny"] == "built-in"
        assert "broken plugin `demo_broken`: segpipe_demo_plugin_gone:net from segpipe-demo-plugin: " in listed.stdout
        assert "ModuleNotFoundError" in listed.stdout
        torch.save(nn.Conv2d(3, 2, 1).state_dict(), tmp_path / "conv.pt")
        made = _segpipe(
            "import-weights",
            str(tmp_path / "conv.pt"),
            "--model",
            "demo_conv",
            "--classes",
            "a,b",
            "--out",
            str(tmp_path / "demo.pt"),
        )
        assert made.returncode == 0, made.stderr
    finally:
        subprocess.run(pip + ["uninstall", "-y", "segpipe-demo-plugin"], check=True, capture_output=True, timeout=120)
    assert "demo_conv" not in _segpipe("models", "--list").stdout
