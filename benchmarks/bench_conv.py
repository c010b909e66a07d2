"""3x3 convolutions of the SRNTT inference path on the CPU (stride 1, zero padding 1, bias, ReLU;
N = 1): the Winograd F(4x4, 3x3) op (``srntt_core.ops.winograd``) against oneDNN's direct
convolution on channels_last input (``mkldnn._convolution_pointwise`` with the ReLU fused, the
current fast path) and plain ``F.conv2d`` + ``relu`` on NCHW input, on the same inputs, in one run.

Shapes: the generator's and the VGG19 prefix's layers at CUFED5 size (the output is 332x500).
``extra_info``: GFLOP/s counted as a direct convolution's (2 * Cin * Cout * 9 * H * W, so Winograd's
figure is an equivalent rate) and the largest difference from oneDNN's result. Compare ratios
within a run: the machine is shared (the load average is in the JSON).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from srntt_core.ops import winograd

# (Cin, Cout, H, W)
LAYERS = [(64, 64, 332, 500), (64, 64, 166, 250), (64, 256, 166, 250), (64, 64, 83, 125), (320, 64, 83, 125),
          (128, 128, 166, 250), (128, 256, 83, 125), (64, 32, 332, 500)]
PROVIDERS = ["winograd", "onednn", "conv2d_nchw"]
ROUNDS = 7


def _name(layer) -> str:
    return "{}to{}-{}x{}".format(*layer)


def _inputs(cin, cout, h, w):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cin, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin**0.5)
    return x, weight, torch.randn(cout, generator=g)


def _onednn(x, weight, bias):
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layer", LAYERS, ids=_name)
def test_conv3x3(bench, data, layer, provider):
    if data.DEVICE.type != "cpu":
        pytest.skip("CPU convolutions")
    if provider == "winograd" and not winograd.available():
        pytest.skip("winograd: the op is not built or this CPU has no AVX2")
    if provider == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("onednn: torch is built without oneDNN")
    cin, cout, h, w = layer
    x, weight, bias = _inputs(*layer)
    if provider == "winograd":
        packed = winograd.pack(weight)

        def fn():
            return winograd.conv3x3(x, packed, bias, relu=True)
    elif provider == "onednn":
        def fn():
            return _onednn(x, weight, bias)
    else:
        x_nchw = x.contiguous()

        def fn():
            return F.conv2d(x_nchw, weight, bias, padding=1).relu_()
    out = bench.run(fn, group=f"conv3x3 {_name(layer)}", provider=provider, shape="cufed5", features="random",
                    n_query=h * w, n_key=0, rounds=ROUNDS, warmup=1, flops=2.0 * cin * cout * 9 * h * w,
                    layer=_name(layer))
    info = bench.benchmark.extra_info
    info["shape"] = f"{cin}->{cout} @ {h}x{w}"
    info["max_abs_diff_vs_onednn"] = float((out - _onednn(x, weight, bias)).abs().max())
