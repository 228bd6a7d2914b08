"""CPU tuning: oneDNN convolutions compute what nn.Conv2d computes, and freed memory is kept for reuse."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from pipeline.cpu_tuning import OneDNNConv2d, route_convs_to_onednn
from pipeline.inference.predictor import Predictor
from pipeline.models import get_model
from pipeline.models.checkpoint import default_meta

CONVS = {
    "1x1": dict(in_channels=16, out_channels=24, kernel_size=1),
    "1x1 no bias": dict(in_channels=16, out_channels=24, kernel_size=1, bias=False),
    "3x3 padded": dict(in_channels=16, out_channels=8, kernel_size=3, padding=1),
    "strided": dict(in_channels=16, out_channels=8, kernel_size=3, stride=2, padding=1),
    "dilated": dict(in_channels=16, out_channels=8, kernel_size=3, padding=2, dilation=2),
    "grouped": dict(in_channels=16, out_channels=16, kernel_size=3, padding=1, groups=4),
    "depthwise": dict(in_channels=16, out_channels=16, kernel_size=5, padding=2, groups=16),
    "rectangular": dict(in_channels=16, out_channels=8, kernel_size=(1, 3), padding=(0, 1)),
}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the case PyTorch routes away from oneDNN
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("name", list(CONVS))
def test_onednn_conv_matches_conv2d(name, layout, one_thread):
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[name]).eval()
    x = torch.randn(2, 16, 23, 37).contiguous(memory_format=layout)
    with torch.inference_mode():
        expected = conv(x)
        assert route_convs_to_onednn(conv) == 1
        assert type(conv) is OneDNNConv2d
        got = conv(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_routed_conv_still_trains(one_thread):
    torch.manual_seed(0)
    conv, plain = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
    plain.load_state_dict(conv.state_dict())
    route_convs_to_onednn(conv)
    x = torch.randn(2, 8, 9, 9)
    conv(x).square().sum().backward()
    plain(x).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad)


def test_routing_leaves_same_padding_subclasses_and_keys_alone():
    class Custom(nn.Conv2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), Custom(4, 4, 1), nn.Conv2d(4, 2, 1))
    keys = list(model.state_dict())
    assert route_convs_to_onednn(model) == 1
    assert [type(m) for m in model] == [nn.Conv2d, Custom, OneDNNConv2d]
    assert list(model.state_dict()) == keys


def test_predictor_routes_cpu_models_and_masks_do_not_change(one_thread):
    torch.manual_seed(0)
    model = get_model("lraspp_mobilenet_v3_large", num_classes=5).eval()
    reference = get_model("lraspp_mobilenet_v3_large", num_classes=5).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 96, 128)
    pred = Predictor(model, default_meta("lraspp_mobilenet_v3_large", list("abcde")), device="cpu")
    assert any(isinstance(m, OneDNNConv2d) for m in pred.model.modules())
    with torch.inference_mode():
        routed, plain = pred.model(x.contiguous(memory_format=torch.channels_last)), reference(x)
    torch.testing.assert_close(routed, plain, rtol=1e-3, atol=1e-4)
    assert (routed.argmax(1) == plain.argmax(1)).float().mean() > 0.999


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_stops_page_faults_on_reused_buffers():
    # In a child process: the setting is process-wide, and any Predictor an earlier test built here has made it.
    script = textwrap.dedent(
        """
        import resource, torch
        from pipeline.cpu_tuning import keep_freed_memory

        def faults(n=10, mb=40):  # over glibc's largest dynamic mmap threshold (32 MB): always mmapped
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(n):
                torch.ones(mb * 2**18)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        default = faults()
        kept = keep_freed_memory()
        faults(20)  # the heap grows to fit, over the first few
        print(default, kept, faults())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    default, kept, after = out.split()
    assert kept == "True"
    pages = 10 * 40 * 2**20 // 4096
    assert int(default) > pages // 2  # every buffer faulted in again
    assert int(after) < pages // 50  # the freed buffer was reused


def test_cpu_predictor_flushes_denormals(tiny_unet):
    import torch

    torch.set_flush_denormal(False)  # an earlier Predictor in this process set it
    tiny = torch.tensor([1e-39])  # below float32's smallest normal (1.2e-38): a denormal
    assert float(tiny * 1.0) > 0
    Predictor(tiny_unet, default_meta("unet_tiny", ["a", "b", "c"]), device="cpu")
    assert float(tiny * 1.0) == 0
