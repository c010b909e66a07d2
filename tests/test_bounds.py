"""Bounds of the integer arguments and memory sanity (docs/DESIGN.md, "Bounds and bad input").

Every integer argument of every public op has a bound checked before any work: a ValueError that
names the argument and the bound; bool is a TypeError. The op layer (torch.ops.srntt.*) and the
C++ kernel-level ops (srntt::_*_fused) check the same bounds. Requests whose output would not be
sane fail with the size they would need, before allocating.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import features

import srntt_core.swap as sw
from srntt_core.ops import extension, geometry

needs_ext = pytest.mark.skipif(not extension.LOADED,
                               reason=f"srntt_core._C not loaded: {extension.LOAD_ERROR}")


def _raises(exc, words, fn, *args, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


# ---------------------------------------------------------------------------------------------
# arguments that crash, hang or return garbage unless bounded: each in a subprocess, so that a
# signal or a hang fails the test instead of killing the run

CRASHERS = textwrap.dedent("""
    import json, sys, torch
    import srntt_core.swap as sw
    ops, B, big = torch.ops.srntt, BACKEND, 2**63 - 1
    q, k = torch.rand(1, 2, 8, 8), torch.rand(1, 2, 8, 8)
    v, i = torch.rand(1, 2, 16, 16), torch.zeros(1, 3, 3, dtype=torch.long)
    g = torch.rand(1, 2, 8, 8)
    cases = {
        ("pm-padding-2**63-1", "padding"): lambda: sw.patch_match(q, k, padding=big, backend=B),
        ("pm-padding-2**61", "padding"): lambda: sw.patch_match(q, k, padding=2**61, backend=B),
        ("pm-stride-2**62", "stride"): lambda: sw.patch_match(q, k, stride=2**62, backend=B),
        ("fs-padding-2**63-1", "padding"): lambda: sw.feature_swap(v, i, padding=big, out_size=(64, 64),
                                                                   backend=B),
        ("fs-padding-2**61", "padding"): lambda: sw.feature_swap(v, i, padding=2**61, out_size=(8, 8),
                                                                 backend=B),
        ("fs-stride-2**62", "stride"): lambda: sw.feature_swap(v, i, stride=2**62, backend=B),
        ("op-pm-padding-2**63-1", "padding"): lambda: ops.patch_match(q, [k], 3, 1, big, B, "highest"),
        ("op-pm-padding-2**61", "padding"): lambda: ops.patch_match(q, [k], 3, 1, 2**61, B, "highest"),
        ("op-fs-padding-2**63-1", "padding"): lambda: ops.feature_swap([v], i, 3, 1, big, 1, 9, 9, "sum", B),
        ("op-fs-padding-2**61", "padding"): lambda: ops.feature_swap([v], i, 3, 1, 2**61, 1, 8, 8, "mean", B),
        ("op-fs-negative-index", "index"): lambda: ops.feature_swap([v], i - 1, 3, 1, 0, 1, 8, 8, "mean", B),
        ("op-fsb-value-sizes", "value_sizes"): lambda: ops.feature_swap_backward(
            g, i, [2**40, 2**40], 3, 1, 0, 1, "mean", B),
    }
    if B == "cpu":
        cases.update({
            ("kernel-pm-padding-2**63-1", "padding"): lambda: ops._patch_match_fused(q, [k], 3, 1, big,
                                                                                     "highest"),
            ("kernel-pm-padding-2**61", "padding"): lambda: ops._patch_match_fused(q, [k], 3, 1, 2**61,
                                                                                   "highest"),
            ("kernel-fs-padding-2**63-1", "padding"): lambda: ops._feature_swap_fused(
                [v], i, 3, 1, big, 1, 64, 64, "mean"),
            ("kernel-fs-padding-2**61", "padding"): lambda: ops._feature_swap_fused(
                [v], i, 3, 1, 2**61, 1, 8, 8, "mean"),
            ("kernel-fs-out-2**40", "out_h"): lambda: ops._feature_swap_fused(
                [v], i, 3, 1, 0, 1, 2**40, 2**40, "mean"),
            ("kernel-fsb-value-sizes", "value_sizes"): lambda: ops._feature_swap_fused_backward(
                g, i, [2**40, 2**40], 3, 1, 0, 1, "mean"),
        })
    for (name, word), fn in cases.items():
        try:
            fn()
            print(json.dumps([name, word, None, ""]), flush=True)
        except Exception as exc:
            print(json.dumps([name, word, type(exc).__name__, str(exc)]), flush=True)
""")



@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
def test_known_crashers_raise_cleanly(backend_name):
    """Arguments that would crash, hang, overflow or leave an output uninitialized raise
    ValueErrors naming the argument, through the public API, the ops and the kernel-level ops."""
    if backend_name not in sw.available("cpu"):
        pytest.skip(f"backend {backend_name} not available")
    code = f"BACKEND = {backend_name!r}\n" + CRASHERS
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(results) == (18 if backend_name == "cpu" else 12), proc.stdout + proc.stderr[-3000:]
    for name, word, exc, message in results:
        assert exc == "ValueError", f"{name}: {exc}: {message}"
        assert word in message, f"{name}: {message}"


# ---------------------------------------------------------------------------------------------
# the bounds of the public API

def _q(h=8, w=8):
    return features(1, 2, h, w, seed=1)


BOUNDS = [
    # (argument, largest accepted value, the bound named in the message)
    ("patch_size", geometry.PATCH_SIZE_MAX, "64"),
    ("stride", geometry.STRIDE_MAX, "64"),
    ("padding", geometry.PADDING_MAX, "64"),
]


@pytest.mark.parametrize("name, top, bound", BOUNDS, ids=[b[0] for b in BOUNDS])
def test_patch_match_bounds(name, top, bound):
    # The largest value works (tiny maps, the other parameters chosen so that the grid is small).
    kwargs = {"patch_size": dict(patch_size=top, padding=30, stride=16),
              "stride": dict(stride=top),
              "padding": dict(padding=top, stride=64)}[name]
    m = sw.patch_match(_q(), _q(), **kwargs)
    ref = sw.patch_match(_q().double(), _q().double(), backend="torch", **kwargs)
    assert torch.equal(m.index, ref.index)
    _raises(ValueError, [name, bound], sw.patch_match, _q(), _q(), **{**kwargs, name: top + 1})
    _raises(ValueError, [name], sw.patch_match, _q(), _q(), **{name: -(2**63)})
    _raises(TypeError, [name], sw.patch_match, _q(), _q(), **{name: True})


@pytest.mark.parametrize("name, value, bound", [
    ("patch_size", 65, "64"), ("stride", 2**62, "64"), ("padding", 65, "64"), ("scale", 17, "16"),
    ("out_size", 2**16 + 1, "65536"),
])
def test_feature_swap_bounds(name, value, bound):
    v, i = features(1, 2, 16, 16, seed=2), torch.zeros(1, 3, 3, dtype=torch.long)
    kwargs = {name: (value, 8) if name == "out_size" else value}
    _raises(ValueError, [name, bound], sw.feature_swap, v, i, **kwargs)
    _raises(TypeError, [name], sw.feature_swap, v, i, **{name: (True, 8) if name == "out_size" else False})


def test_feature_swap_largest_scale_works(backend):
    v = features(1, 2, 48, 48, seed=2, device=backend.device)
    index = torch.zeros(1, 1, 1, dtype=torch.long, device=backend.device)
    out = sw.feature_swap(v, index, scale=geometry.SCALE_MAX, backend=backend.name)
    assert out.shape == (1, 2, 48, 48)
    torch.testing.assert_close(out, v)


def test_weight_maps_bounds():
    score = torch.rand(1, 4, 5)
    _raises(ValueError, ["scales", "16"], sw.weight_maps, score, scales=(1, 17))
    _raises(ValueError, ["scales", "16"], sw.weight_maps, score, scales=(10**6,))
    _raises(TypeError, ["scales"], sw.weight_maps, score, scales=(True,))
    _raises(TypeError, ["scales"], sw.weight_maps, score, scales=4)
    _raises(ValueError, ["out_size", "65536"], sw.weight_maps, score, out_size=(10**6, 8))
    _raises(TypeError, ["out_size"], sw.weight_maps, score, out_size=8)
    _raises(ValueError, ["padding", "64"], sw.weight_maps, score, padding=2**63 - 1)
    _raises(ValueError, ["patch_size", "64"], sw.weight_maps, score, patch_size=2**61)
    assert [m.shape[-1] for m in sw.weight_maps(score, scales=(1, 16))] == [7, 112]


# ---------------------------------------------------------------------------------------------
# memory sanity: the size it would need, before allocating

def test_feature_swap_huge_output_is_refused_before_allocating():
    v, i = features(2, 64, 48, 48, seed=2), torch.zeros(2, 1, 1, dtype=torch.long)
    # 2 x 64 x 60000 x 60000: 4.6e11 elements; any allocation would fail or swap. The index is a
    # stride-0 view of the 3748x3748 grid of a 3750x3750 query map (60000 // 16).
    with pytest.raises(ValueError, match=r"out_size: would need a 2x64x60000x60000 tensor \(460800000000 "
                                         r"elements, 1\.72e\+03 GiB\)"):
        sw.feature_swap(v, i.expand(2, 3748, 3748), scale=16, out_size=(60000, 60000))
    _raises(ValueError, ["out_size", "65536"], sw.feature_swap, v, i, out_size=(10**6, 10**6))


def test_feature_swap_huge_index_is_refused():
    """A 100 M-cell index (a stride-0 view here: no memory) is refused before any work."""
    index = torch.zeros(1, 1, 1, dtype=torch.long).expand(1, 10**4, 10**4)
    _raises(ValueError, ["index", "100000000", str(geometry.CELLS_MAX)], sw.feature_swap,
            features(1, 2, 16, 16, seed=2), index)


def test_weight_maps_huge_output_is_refused():
    _raises(ValueError, ["scales", "GiB"], sw.weight_maps, torch.rand(4, 60, 60), scales=(1, 16),
            out_size=(60000, 60000))


def test_patch_match_huge_descriptor_is_refused():
    q = torch.zeros(1, 100, 1, 1).expand(1, 100, 64, 64)
    _raises(ValueError, ["query", "409600", str(geometry.DESCRIPTOR_MAX)], sw.patch_match, q, q,
            patch_size=64)


# ---------------------------------------------------------------------------------------------
# the op layer and the C++ kernel-level ops check the same bounds

@pytest.mark.parametrize("name, top", [("patch_size", geometry.PATCH_SIZE_MAX),
                                       ("stride", geometry.STRIDE_MAX),
                                       ("padding", geometry.PADDING_MAX)])
def test_ops_check_the_bounds(backend, name, top):
    q = _q().to(backend.device)
    args = dict(patch_size=3, stride=64, padding=1)
    args[name] = top + 1
    _raises(ValueError, [name, str(top)], torch.ops.srntt.patch_match, q, [q], args["patch_size"],
            args["stride"], args["padding"], backend.name, "highest")
    v, i = features(1, 2, 16, 16, seed=2, device=backend.device), torch.zeros(1, 3, 3, dtype=torch.long)
    _raises(ValueError, [name, str(top)], torch.ops.srntt.feature_swap, [v], i.to(backend.device),
            args["patch_size"], args["stride"], args["padding"], 1, 8, 8, "mean", backend.name)


@needs_ext
@pytest.mark.parametrize("name, top", [("patch_size", geometry.PATCH_SIZE_MAX),
                                       ("stride", geometry.STRIDE_MAX),
                                       ("padding", geometry.PADDING_MAX),
                                       ("scale", geometry.SCALE_MAX),
                                       ("out_h", geometry.SIDE_MAX),
                                       ("out_w", geometry.SIDE_MAX)])
def test_kernel_bounds_agree_with_geometry(name, top):
    """csrc/srntt_geometry.h and srntt_core/ops/geometry.py state the same bounds: the C++ ops accept
    the top value and reject the next with a ValueError naming the argument and the bound."""
    args = dict(patch_size=1, stride=1, padding=0, scale=1, out_h=1, out_w=1)
    v = features(1, 1, top if name == "scale" else 2, top if name == "scale" else 2, seed=2)
    index = torch.zeros(1, 1, 1, dtype=torch.long)
    if name == "patch_size":
        args.update(padding=32)

    def swap(**over):
        a = {**args, **over}
        return torch.ops.srntt._feature_swap_fused([v], index, a["patch_size"], a["stride"], a["padding"],
                                                   a["scale"], a["out_h"], a["out_w"], "sum")

    def match(**over):
        a = {**args, **over}
        return torch.ops.srntt._patch_match_fused(v, [v], a["patch_size"], a["stride"], a["padding"],
                                                  "highest")

    swap(**{name: top})
    _raises(ValueError, [name, str(top)], swap, **{name: top + 1})
    _raises(ValueError, [name], swap, **{name: -(2**63)})
    if name in ("patch_size", "stride", "padding"):
        match(**{name: top})
        _raises(ValueError, [name, str(top)], match, **{name: top + 1})
        _raises(ValueError, [name], match, **{name: 2**63 - 1})


# ---------------------------------------------------------------------------------------------
# csrc/srntt_geometry.h (every C++ and CUDA kernel) and srntt_core/ops/geometry.py state the same facts

GEOMETRY_PROBE = textwrap.dedent(r"""
    #include <cstdio>
    #include <initializer_list>
    #include "srntt_geometry.h"
    int main() {
      const struct { const char* name; long long value; } bounds[] = {
          {"PATCH_SIZE_MAX", srntt::kPatchSizeMax}, {"STRIDE_MAX", srntt::kStrideMax},
          {"PADDING_MAX", srntt::kPaddingMax}, {"SCALE_MAX", srntt::kScaleMax},
          {"SIDE_MAX", srntt::kSideMax}, {"CELLS_MAX", srntt::kCellsMax},
          {"DESCRIPTOR_MAX", srntt::kDescriptorMax}, {"ELEMENTS_MAX", srntt::kElementsMax},
          {"TOPK_MAX", srntt::kTopKMax}, {"CONV_CHANNELS_MAX", srntt::kConvChannelsMax}};
      std::printf("{\"EPS\": %.17g", srntt::kNormEps);
      for (const auto& b : bounds) std::printf(", \"%s\": %lld", b.name, b.value);
      std::printf(", \"grid\": [");
      const char* sep = "";
      for (long long size : {0LL, 1LL, 2LL, 3LL, 7LL, 8LL, 31LL, 64LL, 65536LL})
        for (long long p : {1LL, 2LL, 3LL, 5LL, 64LL})
          for (long long s : {1LL, 2LL, 3LL, 64LL})
            for (long long pad : {0LL, 1LL, 2LL, 64LL}) {
              if (size + 2 * pad < p) continue;
              std::printf("%s[%lld, %lld, %lld, %lld, %lld, %d]", sep, size, p, s, pad,
                          (long long)srntt::grid_size<int64_t>(size, p, s, pad),
                          srntt::grid_size<int>(int(size), int(p), int(s), int(pad)));
              sep = ", ";
            }
      std::printf("]}\n");
    }
""")


def test_cpp_geometry_header_agrees_with_geometry(tmp_path):
    """The norm epsilon, the bounds and the grid formula of csrc/srntt_geometry.h, compiled and
    run, equal those of srntt_core/ops/geometry.py (the header is torch-free: any C++17 compiler)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "probe.cpp").write_text(GEOMETRY_PROBE)
    include = pathlib.Path(__file__).resolve().parents[1] / "csrc"
    subprocess.run([cxx, "-std=c++17", f"-I{include}", "probe.cpp", "-o", "probe"], cwd=tmp_path,
                   check=True, timeout=120)
    facts = json.loads(subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True,
                                      check=True, timeout=60).stdout)
    assert facts.pop("EPS") == geometry.EPS
    cases = facts.pop("grid")
    assert facts == {name: getattr(geometry, name) for name in facts}
    assert len(facts) == 10 and len(cases) > 500
    for size, p, s, pad, g64, g32 in cases:
        assert g64 == g32 == geometry.grid_size(size, p, s, pad), (size, p, s, pad)


@needs_ext
@pytest.mark.parametrize("dtype, stride", [(torch.float32, 1), (torch.float32, 2), (torch.float64, 1)])
def test_cpu_kernel_uses_the_norm_epsilon(dtype, stride):
    """A query patch of norm 1e-13 (< EPS) scores <q, k> / (EPS * |k|) in the C++ kernel, on the
    stride-1 float32 path and the blocked path alike."""
    key = torch.zeros(1, 4, 3, 3, dtype=dtype)
    key[0, 0] = 1.0
    query = key * 1e-13
    index, score = torch.ops.srntt._patch_match_fused(query, [key], 1, stride, 0, "highest")
    expected = 1e-13 / (geometry.EPS * 1.0)
    torch.testing.assert_close(score, torch.full_like(score, expected), rtol=1e-6, atol=0)
