"""The default build runs on any x86-64 CPU: the hot loops dispatch at run time to an AVX2/FMA or
AVX-512 variant (csrc/cpu/cpu_dispatch.h), and nothing else in the library uses AVX instructions.
"""

import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import srntt_core
from srntt_core.ops import extension

pytestmark = pytest.mark.skipif(not extension.LOADED, reason=f"extension not loaded: {extension.LOAD_ERROR}")

TESTS = Path(__file__).parent


def capability() -> str:
    return torch.ops.srntt._cpu_capability()


def test_capability_is_reported():
    assert capability() in ("default", "avx2", "avx512", "native")
    assert f"CPU kernels: {capability()}" in srntt_core.build_info()


# The kernels of the baseline variant against the float64 oracle, in a process that asks for it:
# float32 on both patch_match algorithms (stride 1: overlap; stride 2: blocked), float64, duplicated
# key patches (ties), and feature_swap on the packed (scale 1, 2) and plane (scale 4) paths with its
# backward.
BASELINE_CHECK = textwrap.dedent("""
    import torch
    import srntt_core.swap as sw
    from conftest import assert_match, exact_match, features, naive_feature_swap, random_index

    print("capability", torch.ops.srntt._cpu_capability())
    for dtype, stride, padding in [(torch.float32, 1, 0), (torch.float32, 1, 1), (torch.float32, 2, 1),
                                   (torch.float64, 1, 0)]:
        q = features(2, 16, 13, 17, seed=1, dtype=dtype)
        k1 = features(2, 16, 11, 9, seed=2, dtype=dtype)
        k1[..., 5:8, :] = k1[..., 0:3, :]  # duplicated patches: ties go to the smallest index
        keys = [k1, features(2, 16, 15, 12, seed=3, dtype=dtype)]
        m = sw.patch_match(q, keys, stride=stride, padding=padding, backend="cpu")
        assert_match(m, exact_match(q, keys, 3, stride, padding))
    for scale, dtype in [(1, torch.float32), (2, torch.float32), (4, torch.float32), (2, torch.float64)]:
        values = [features(2, 16, 11 * scale, 9 * scale, seed=4, dtype=dtype).requires_grad_()]
        index = random_index(values, (10, 12), scale=scale, seed=5)
        out = sw.feature_swap(values, index, scale=scale, backend="cpu")
        want = naive_feature_swap(values, index, scale=scale)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
        grad = torch.rand_like(out)
        (got,) = torch.autograd.grad(out, values, grad)
        oracle = [v.detach().double().requires_grad_() for v in values]
        (exact,) = torch.autograd.grad(sw.feature_swap(oracle, index, scale=scale, backend="torch"),
                                       oracle, grad.double())
        torch.testing.assert_close(got.double(), exact, atol=1e-5, rtol=1e-5)
    print("baseline ok")
""")


def test_baseline_variant_matches_oracle():
    if capability() == "native":
        pytest.skip("SRNTT_NATIVE=1 build: the hot loops have one variant, tested by every other test")
    env = {**os.environ, "SRNTT_CPU_CAPABILITY": "default",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", BASELINE_CHECK], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "capability default" in out.stdout and "baseline ok" in out.stdout, out.stdout


def test_no_avx_outside_the_dispatched_variants():
    """Every instruction that needs AVX (VEX/EVEX-encoded, ymm/zmm registers) lies in a run_avx2 or
    run_avx512 instantiation: the library loads and runs on a CPU without AVX."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"x86-64 only, this is {platform.machine()}")
    if capability() == "native":
        pytest.skip("SRNTT_NATIVE=1 build: compiled for this CPU on purpose")
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to inspect the extension"
    import srntt_core._C as ext

    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", ext.__file__], capture_output=True,
                             text=True, check=True, timeout=300).stdout
    function, variants, outside = None, 0, {}
    avx = re.compile(r"%[yz]mm\d|^v[a-z0-9]+$")
    for line in listing.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            function = head.group(1)
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        mnemonic = fields[1].split()[0] if fields[1].split() else ""
        operands = fields[1][len(mnemonic):]
        if avx.search(mnemonic) or avx.search(operands):
            if "run_avx2" in function or "run_avx512" in function:
                variants += 1
            else:
                outside[function] = outside.get(function, 0) + 1
    assert not outside, f"AVX instructions outside the dispatched variants: {sorted(outside)[:5]}"
    assert variants > 0, "no AVX2/AVX-512 variant found: the hot loops are not dispatched"
