"""The model registry and unet_tiny's any-size forward pass."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import get_model, list_models, register_model
from pipeline.models.unet_tiny import UNetTiny


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
