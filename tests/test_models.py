"""The model zoo: the any-size contract, parameter counts, FCN's bilinear upsampling, foreign weights, defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import segmentation

from pipeline.errors import CheckpointError
from pipeline.models import get_model, list_models
from pipeline.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD, default_meta, load_checkpoint
from pipeline.models.fcn import bilinear_kernel
from pipeline.models.weights_import import checkpoint_from_foreign, import_state_dict

VOC = tuple(f"class{i}" for i in range(21))


def _count(name: str, **kw) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return sum(p.numel() for p in get_model(name, **kw).parameters())


def _perturb_(model: nn.Module, seed: int) -> nn.Module:
    """Random values for the zero-initialised parameters (FCN's score layers, biases) and the BatchNorm
    statistics, so that outputs are neither trivially zero nor blind to the running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def test_all_families_registered():
    expected = {
        "fcn32s",
        "fcn16s",
        "fcn8s",
        "unet",
        "fpn",
        "deeplabv3",
        "fcn_resnet50",
        "fcn_resnet101",
        "deeplabv3_resnet50",
        "deeplabv3_resnet101",
        "deeplabv3_mobilenet_v3_large",
        "lraspp_mobilenet_v3_large",
        "unet_tiny",
    }
    assert expected <= set(list_models())


@pytest.fixture
def two_threads():
    """The suite's tensors are tiny and run on one thread; these full-size forward passes take both cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list_models())
def test_any_size_contract(name, two_threads):
    """Logits [N, C, H, W] at the input size, finite, and each image's independent of its batch mates."""
    torch.manual_seed(0)
    model = _perturb_(get_model(name, num_classes=5), seed=1).eval()
    assert isinstance(getattr(model, "stride", None), int)
    for h, w in [(97, 131), (161, 227)]:  # neither a multiple of any stride; the larger one spans 5+ strides of 32
        x = torch.randn(2, 3, h, w)
        with torch.inference_mode():
            both = model(x)
            # Batch independence at the small size only: the large one would double the file's time (VGG16).
            singles = torch.cat([model(x[:1]), model(x[1:])]) if h == 97 else both
        assert isinstance(both, torch.Tensor)
        assert both.shape == (2, 5, h, w)
        assert torch.isfinite(both).all()
        assert both.std() > 0
        scale = max(1.0, both.abs().max().item())  # the random deep nets reach 1e4 without BatchNorm statistics
        torch.testing.assert_close(both, singles, rtol=1e-4, atol=1e-4 * scale)


def test_fcn8s_parameters_match_the_paper():
    # Long et al. 2015, table 1: FCN-VGG16 has 134M parameters
    n = _count("fcn8s", num_classes=21)
    assert abs(n - 134e6) / 134e6 < 0.01, n


@pytest.mark.parametrize(
    ("name", "weights", "published"),
    [
        ("fcn_resnet50", segmentation.FCN_ResNet50_Weights, 35_322_218),
        ("fcn_resnet101", segmentation.FCN_ResNet101_Weights, 54_314_346),
        ("deeplabv3_resnet50", segmentation.DeepLabV3_ResNet50_Weights, 42_004_074),
        ("deeplabv3_resnet101", segmentation.DeepLabV3_ResNet101_Weights, 60_996_202),
        ("deeplabv3_mobilenet_v3_large", segmentation.DeepLabV3_MobileNet_V3_Large_Weights, 11_029_328),
        ("lraspp_mobilenet_v3_large", segmentation.LRASPP_MobileNet_V3_Large_Weights, 3_221_538),
    ],
)
def test_torchvision_parameter_counts_are_the_published_ones(name, weights, published):
    assert weights.COCO_WITH_VOC_LABELS_V1.meta["num_params"] == published
    assert _count(name, num_classes=21) == published


@pytest.mark.parametrize("size", range(1, 17))
def test_bilinear_kernel_is_the_reference_formula(size):
    og = np.ogrid[:size, :size]
    f = (size + 1) // 2
    c = f - 1 if size % 2 == 1 else f - 0.5
    filt = (1 - abs(og[0] - c) / f) * (1 - abs(og[1] - c) / f)
    kernel = bilinear_kernel(3, 3, size)
    assert kernel.shape == (3, 3, size, size)
    for i in range(3):
        for j in range(3):
            expected = filt if i == j else np.zeros_like(filt)
            np.testing.assert_allclose(kernel[i, j].numpy(), expected, rtol=0, atol=1e-7)


def test_bilinear_conv_transpose_upsamples_a_ramp_exactly():
    up = nn.ConvTranspose2d(2, 2, 4, stride=2, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(2, 2, 4))
    ii, jj = torch.meshgrid(torch.arange(9.0), torch.arange(12.0), indexing="ij")
    ramp = torch.stack([3 * ii + 2 * jj, -ii + 0.5 * jj])[None]  # [1, 2, 9, 12]
    with torch.no_grad():
        out = up(ramp)
    assert out.shape == (1, 2, 2 * 9 + 2, 2 * 12 + 2)
    # output pixel o sits at input coordinate (o - 1.5) / 2; the two outer rows and columns on each side
    # see only one input row or column
    oi, oj = torch.meshgrid((torch.arange(20.0) - 1.5) / 2, (torch.arange(26.0) - 1.5) / 2, indexing="ij")
    expected = torch.stack([3 * oi + 2 * oj, -oi + 0.5 * oj])[None]
    torch.testing.assert_close(out[..., 2:-2, 2:-2], expected[..., 2:-2, 2:-2], rtol=0, atol=1e-5)


def test_fcn_upsampling_starts_bilinear_and_scores_zero():
    model = get_model("fcn8s", num_classes=4)
    for name in ("upscore2", "upscore_pool4", "upscore8"):
        layer = getattr(model, name)
        assert layer.bias is None
        assert torch.equal(layer.weight, bilinear_kernel(4, 4, layer.kernel_size[0]))
    for name in ("score_fr", "score_pool4", "score_pool3"):
        assert not getattr(model, name).weight.any()
    assert model.conv1_1.padding == (100, 100)


def _torchvision_pair(name: str, tv_name: str, **kw):
    torch.manual_seed(3)
    reference = _perturb_(getattr(segmentation, tv_name)(weights=None, weights_backbone=None, **kw), 4).eval()
    data = checkpoint_from_foreign(name, reference.state_dict(), VOC[: kw["num_classes"]])
    model, meta = load_checkpoint(data, f"{name}.pt", expect_arch=name)
    return reference, model, meta


@pytest.mark.parametrize(
    ("name", "tv_name", "kw"),
    [
        ("fcn_resnet50", "fcn_resnet50", {"num_classes": 21, "aux_loss": True}),
        ("deeplabv3", "deeplabv3_resnet50", {"num_classes": 21, "aux_loss": True}),
        ("lraspp_mobilenet_v3_large", "lraspp_mobilenet_v3_large", {"num_classes": 21}),
    ],
)
def test_torchvision_state_dict_gives_identical_outputs(name, tv_name, kw):
    reference, model, meta = _torchvision_pair(name, tv_name, **kw)
    assert meta.arch == name and meta.num_classes == 21
    x = torch.randn(2, 3, 70, 90, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x)["out"], rtol=0, atol=0)


def _pytorch_fcn_fcn8s_state_dict(n_class: int) -> dict[str, torch.Tensor]:
    """Random weights under wkentaro/pytorch-fcn's FCN8s keys and shapes (torchfcn/models/fcn8s.py)."""
    g = torch.Generator().manual_seed(6)
    shapes = {}
    cin = 3
    for block, (n, width) in enumerate([(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)], 1):
        for i in range(1, n + 1):
            shapes[f"conv{block}_{i}"] = ((width, cin, 3, 3), True)
            cin = width
    shapes |= {
        "fc6": ((4096, 512, 7, 7), True),
        "fc7": ((4096, 4096, 1, 1), True),
        "score_fr": ((n_class, 4096, 1, 1), True),
        "score_pool3": ((n_class, 256, 1, 1), True),
        "score_pool4": ((n_class, 512, 1, 1), True),
        "upscore2": ((n_class, n_class, 4, 4), False),
        "upscore8": ((n_class, n_class, 16, 16), False),
        "upscore_pool4": ((n_class, n_class, 4, 4), False),
    }
    sd = {}
    for name, (shape, bias) in shapes.items():
        fan_in = shape[1] * shape[2] * shape[3]
        sd[f"{name}.weight"] = torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5
        if bias:
            sd[f"{name}.bias"] = torch.randn(shape[0], generator=g) * 0.01
    return sd


def _pytorch_fcn_fcn8s_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """pytorch-fcn's FCN8s.forward, transcribed with functional ops (eval mode: dropout off)."""
    h = x
    for block, n in enumerate([2, 2, 3, 3, 3], 1):
        for i in range(1, n + 1):
            w, b = sd[f"conv{block}_{i}.weight"], sd[f"conv{block}_{i}.bias"]
            h = F.relu(F.conv2d(h, w, b, padding=100 if block == i == 1 else 1))
        h = F.max_pool2d(h, 2, stride=2, ceil_mode=True)
        if block == 3:
            pool3 = h
        if block == 4:
            pool4 = h
    h = F.relu(F.conv2d(h, sd["fc6.weight"], sd["fc6.bias"]))
    h = F.relu(F.conv2d(h, sd["fc7.weight"], sd["fc7.bias"]))
    h = F.conv2d(h, sd["score_fr.weight"], sd["score_fr.bias"])
    upscore2 = F.conv_transpose2d(h, sd["upscore2.weight"], stride=2)
    h = F.conv2d(pool4, sd["score_pool4.weight"], sd["score_pool4.bias"])
    score_pool4c = h[:, :, 5 : 5 + upscore2.size(2), 5 : 5 + upscore2.size(3)]
    upscore_pool4 = F.conv_transpose2d(upscore2 + score_pool4c, sd["upscore_pool4.weight"], stride=2)
    h = F.conv2d(pool3, sd["score_pool3.weight"], sd["score_pool3.bias"])
    score_pool3c = h[:, :, 9 : 9 + upscore_pool4.size(2), 9 : 9 + upscore_pool4.size(3)]
    h = F.conv_transpose2d(upscore_pool4 + score_pool3c, sd["upscore8.weight"], stride=8)
    return h[:, :, 31 : 31 + x.size(2), 31 : 31 + x.size(3)]


def test_pytorch_fcn_fcn8s_state_dict_loads_and_matches_its_forward():
    sd = _pytorch_fcn_fcn8s_state_dict(21)
    assert import_state_dict("fcn8s", sd).keys() == sd.keys()  # the mapping is the identity
    model, meta = load_checkpoint(checkpoint_from_foreign("fcn8s", sd, VOC), "fcn8s.pt", expect_classes=21)
    assert (meta.arch, meta.stride, meta.input_policy) == ("fcn8s", 1, "pad")
    x = torch.randn(1, 3, 37, 53, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), _pytorch_fcn_fcn8s_forward(sd, x), rtol=1e-4, atol=1e-5)


def test_foreign_weights_that_do_not_fit_are_refused():
    sd = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).state_dict()
    head = r"wrong shape \(4\): classifier.low_classifier.weight \(file \[21, 40, 1, 1\], model \[5, 40, 1, 1\]\)"
    with pytest.raises(CheckpointError, match="'lraspp_mobilenet_v3_large' with 5 classes: " + head):
        checkpoint_from_foreign("lraspp_mobilenet_v3_large", sd, VOC[:5])
    with pytest.raises(CheckpointError, match="'unet' with 21 classes: missing .* unexpected .* and 3.. more"):
        checkpoint_from_foreign("unet", sd, VOC)


@pytest.mark.parametrize(
    ("name", "stride"),
    [("unet", 16), ("fpn", 32), ("fcn8s", 1), ("fcn32s", 1), ("deeplabv3", 8), ("lraspp_mobilenet_v3_large", 16)],
)
def test_default_meta(name, stride):
    meta = default_meta(name, ("bg", "a", "b"))
    assert (meta.arch, meta.class_names, meta.input_policy, meta.stride) == (name, ("bg", "a", "b"), "pad", stride)
    assert (meta.mean, meta.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert meta.palette == ((0, 0, 0), (128, 0, 0), (0, 128, 0))  # VOC colours


def test_unet_is_the_original_layout():
    model = get_model("unet", num_classes=2)
    widths = [block[0].out_channels for block in model.down]
    assert widths == [64, 128, 256, 512, 1024]
    assert all(isinstance(m, nn.ConvTranspose2d) and m.kernel_size == (2, 2) for m in model.upconv)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in get_model("unet", num_classes=2, batch_norm=True).modules())
