"""The Winograd F(4x4, 3x3) convolution (srntt::_winograd_conv3x3, srntt_core.ops.winograd) against
float64 ``F.conv2d``, the oracle.

NB: Winograd's float32 error grows with the coefficients of its transforms (B^T up to 5, A^T up to
8, G down to 1/24), so it is bounded relative to the convolution of the magnitudes,
``conv2d(|x|, |w|) + |bias| + |other|``: |y - oracle| over that scale's largest value in the
output's 4x4 tile. Measured on the
shapes below (standard normal x, w, bias, other, AVX2 variant): at most ~4e-7 (the 1x1 image,
whose single tile uses few points) to ~1.3e-6 (320 input channels); a direct float32 convolution
has ~1e-7. ``BOUND`` is a few times the largest: a wrong transform coefficient, a missed
border or a wrong tile offset gives errors of order 1e-2 to 1.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from srntt_core.ops import extension, winograd

pytestmark = pytest.mark.skipif(not extension.has_kernel("_winograd_conv3x3", "CPU"),
                                reason=f"srntt_core._C has no Winograd kernel ({extension.LOAD_ERROR})")

BOUND = 5e-6

# (N, Cin, Cout, H, W): H, W not multiples of 4, single pixels and partial tiles, Cin != Cout, a
# Cout with a half-width panel (24 = 16 + 8).
SHAPES = [(1, 64, 256, 13, 11), (1, 320, 64, 9, 7), (1, 128, 128, 8, 8), (1, 8, 8, 1, 1),
          (1, 8, 8, 3, 5), (2, 16, 24, 10, 6), (2, 64, 64, 17, 23)]


def _inputs(n, cin, cout, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 3, 3, generator=g)
    bias = torch.randn(cout, generator=g)
    other = torch.randn(n, cout, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    return x, weight, bias, other


def _oracle(x, weight, bias, other, relu):
    """(float64 result, float64 magnitude scale) of relu?(conv2d(x, w, bias, padding=1) + other)."""
    b64 = None if bias is None else bias.double()
    y = F.conv2d(x.double(), weight.double(), b64, padding=1)
    scale = F.conv2d(x.double().abs(), weight.double().abs(), None if bias is None else b64.abs(), padding=1)
    if other is not None:
        y = y + other.double()
        scale = scale + other.double().abs()
    return (y.relu() if relu else y), scale


def _rel_error(y, x, weight, bias, other, relu):
    """max |y - oracle| / scale, the scale taken per 4x4 output tile (its largest value): the
    products of a tile mix in the transform domain, so each output's rounding error scales with its
    whole tile's magnitudes, not only its own."""
    ref, scale = _oracle(x, weight, bias, other, relu)
    h, w = ref.shape[-2:]
    tile = F.max_pool2d(scale, 4, 4, ceil_mode=True).repeat_interleave(4, -2).repeat_interleave(4, -1)
    return ((y.double() - ref).abs() / tile[..., :h, :w]).max().item()


EPILOGUES = {"plain": (False, False, False), "bias-relu": (True, False, True),
             "bias-other-relu": (True, True, True), "other": (False, True, False)}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}-{}to{}-{}x{}".format(*s))
@pytest.mark.parametrize("bias,other,relu", list(EPILOGUES.values()), ids=list(EPILOGUES))
def test_matches_float64_conv(shape, bias, other, relu):
    x, weight, b, o = _inputs(*shape)
    b, o = (b if bias else None), (o if other else None)
    y = winograd.conv3x3(x, winograd.pack(weight), b, other=o, relu=relu)
    assert y.shape == (shape[0], shape[2], shape[3], shape[4])
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert _rel_error(y, x, weight, b, o, relu) < BOUND


def test_borders():
    """Every border pixel of an image whose sides are not multiples of 4 reads zeros outside the
    image and nothing of the neighbouring row: x is zero except for its outermost rows and columns,
    so the whole output comes from the border handling."""
    x, weight, bias, _ = _inputs(1, 8, 16, 7, 10, seed=3)
    inner = torch.zeros_like(x)
    inner[..., 1:-1, 1:-1] = 1
    x = (x * (1 - inner)).contiguous(memory_format=torch.channels_last)
    y = winograd.conv3x3(x, winograd.pack(weight), bias)
    assert _rel_error(y, x, weight, bias, None, False) < BOUND


def test_results_do_not_depend_on_threads():
    x, weight, bias, other = _inputs(2, 32, 48, 29, 31, seed=4)
    packed = winograd.pack(weight)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(winograd.conv3x3(x, packed, bias, other, relu=True))
    finally:
        torch.set_num_threads(threads)
    for y in runs[1:]:
        assert torch.equal(y, runs[0])


def test_pack_is_the_filter_transform():
    """pack(w) for a filter that is one at a single tap: U = G e_ij G^T, the outer product of G's
    columns i and j (checked at point (0, 0) = G[0, i] G[0, j] = 1/16 for the top-left tap)."""
    weight = torch.zeros(8, 8, 3, 3)
    weight[:, :, 0, 0] = 1
    packed = winograd.pack(weight)
    assert packed.shape == (36, 8, 8)
    assert torch.allclose(packed[0], torch.full((8, 8), 1 / 16))
    assert torch.allclose(packed[35], torch.zeros(8, 8))  # G[5] is (0, 0, 1): no top-left tap


def test_eligible():
    w = torch.randn(16, 8, 3, 3)
    x = torch.randn(1, 8, 5, 5)
    assert winograd.eligible(w, x)
    assert winograd.eligible(w, x, stride=(1, 1), padding=[1, 1], dilation=1)
    assert not winograd.eligible(w, x, stride=2)
    assert not winograd.eligible(w, x, padding=0)
    assert not winograd.eligible(w, x, dilation=2)
    assert not winograd.eligible(w, x, groups=2)
    assert not winograd.eligible(w, x, padding_mode="reflect")
    assert not winograd.eligible(w.double(), x.double())
    assert not winograd.eligible(torch.randn(12, 8, 3, 3), x)
    assert not winograd.eligible(torch.randn(16, 12, 3, 3), torch.randn(1, 12, 5, 5))
    assert not winograd.eligible(torch.randn(16, 8, 5, 5), x)
    assert not winograd.eligible(w, torch.randn(1, 16, 5, 5))


def test_available_matches_capability():
    assert winograd.available() == (torch.ops.srntt._cpu_capability() in ("avx2", "avx512", "native"))


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case,match", [
    ("x_dtype", "x must be float32"),
    ("x_dims", "x must have 4 dimensions"),
    ("x_layout", "x must be channels_last"),
    ("x_channels", "x's channels must be a multiple of 8"),
    ("x_channels_bound", r"x's channels must be in \[8, 4096\]"),
    ("packed_cin", "packed must be a contiguous"),
    ("packed_dtype", "packed must be float32"),
    ("bias_shape", "bias must be a contiguous"),
    ("bias_dtype", "bias must be float32"),
    ("other_shape", "other must be"),
    ("other_layout", "other must be channels_last"),
])
def test_bad_input(case, match):
    x, weight, bias, other = _inputs(1, 16, 8, 5, 6)
    packed = winograd.pack(weight)
    args = {"x": x, "packed": packed, "bias": bias, "other": other}
    bad = {
        "x_dtype": {"x": x.double()},
        "x_dims": {"x": x[0]},
        "x_layout": {"x": x.contiguous()},
        "x_channels": {"x": _cl(torch.randn(1, 12, 5, 6))},
        "x_channels_bound": {"x": _cl(torch.randn(1, 4104, 1, 1))},
        "packed_cin": {"packed": winograd.pack(torch.randn(8, 8, 3, 3))},
        "packed_dtype": {"packed": packed.double()},
        "bias_shape": {"bias": torch.randn(16)},
        "bias_dtype": {"bias": bias.half()},
        "other_shape": {"other": _cl(torch.randn(1, 8, 5, 5))},
        "other_layout": {"other": other.contiguous()},
    }[case]
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        torch.ops.srntt._winograd_conv3x3(args["x"], args["packed"], args["bias"], args["other"], True)


@pytest.mark.parametrize("shape,match", [((8, 8, 5, 5), r"weight must be \(Cout, Cin, 3, 3\)"),
                                         ((12, 8, 3, 3), "weight's Cout must be a multiple of 8"),
                                         ((8, 4, 3, 3), r"weight's Cin must be in \[8, 4096\]"),
                                         ((8, 8, 3), "weight must have 4 dimensions")])
def test_pack_bad_input(shape, match):
    with pytest.raises(ValueError, match=match):
        winograd.pack(torch.randn(shape))
    with pytest.raises(ValueError, match="weight must be float32"):
        winograd.pack(torch.randn(8, 8, 3, 3, dtype=torch.float64))


def test_opcheck():
    """Schema and fake kernels (torch.compile traces the ops)."""
    x, weight, bias, other = _inputs(1, 8, 16, 5, 6)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.srntt._winograd_pack.default, (weight,), test_utils=checks)
    packed = winograd.pack(weight)
    for args in ((x, packed, bias, other, True), (x, packed, None, None, False)):
        torch.library.opcheck(torch.ops.srntt._winograd_conv3x3.default, args, test_utils=checks)


BASELINE_CHECK = """
import sys
import torch
import test_winograd as T
from srntt_core.ops import winograd
print("capability", torch.ops.srntt._cpu_capability())
assert not winograd.available()
for shape in [(1, 64, 24, 13, 11), (2, 8, 16, 3, 5)]:
    x, weight, bias, other = T._inputs(*shape)
    y = winograd.conv3x3(x, winograd.pack(weight), bias, other, relu=True)
    assert T._rel_error(y, x, weight, bias, other, True) < T.BOUND
print("baseline ok")
"""


def test_baseline_variant():
    """The x86-64 baseline variant of the kernel (SRNTT_CPU_CAPABILITY=default) is as exact; only
    not used by default (``available()`` is False there)."""
    if torch.ops.srntt._cpu_capability() == "native":
        pytest.skip("SRNTT_NATIVE=1 build: one variant, tested by every other test")
    env = {**os.environ, "SRNTT_CPU_CAPABILITY": "default",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", BASELINE_CHECK], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "capability default" in out.stdout and "baseline ok" in out.stdout, out.stdout
