"""texture_swap end to end: VGG19 (three passes) + relu3_1 match + swaps at three levels; then the
whole super-resolution (``infer.super_resolve``: swap stage + generator) and the ``srntt sr`` process.

Real images only (the two halves of a Sun80 image, LR = bicubic x1/4 of the target half).
Providers: ``srntt_core.swap.texture_swap`` on each backend, and the same stage built from the
peers: ``ttsr`` (unfold + bmm match, gather + fold swap) and ``srntt`` (chunked conv2d match,
Python-loop swap). All share one VGG19 extractor, so the differences are the match and the swap.
"""

from __future__ import annotations

import subprocess
import sys
import time

import peers
import pytest
import torch

import srntt_core.swap as sw
from srntt_core.models import infer
from srntt_core.ops import dispatch

BACKENDS = list(dispatch.BACKENDS)
PEER_STAGES = {
    "ttsr": (peers.ttsr_patch_match, peers.ttsr_fold_swap),
    "srntt": (peers.srntt_conv_patch_match, peers.python_loop_swap),
}
LARGE_DEFAULT: set = set()  # 1080p end to end is opt-in: SRNTT_BENCH_LARGE=1
ROUNDS = {"train": 5, "cufed5": 2, "1080p": 1}


@pytest.mark.parametrize("provider", BACKENDS + list(PEER_STAGES))
def test_texture_swap(bench, data, shape, provider):
    if provider in BACKENDS:
        reasons = dispatch.get(provider).not_supported_reasons(data.DEVICE)
        if reasons:
            pytest.skip(f"{provider}: {'; '.join(reasons)}")
    h, w = data.SHAPES[shape]
    n = (h - 2) * (w - 2)
    if provider == "ttsr":
        data.skip_if_too_big(peers.ttsr_patch_match_bytes(n, n, data.CHANNELS), "the N x N relevance matrix")
    if provider == "torch" and shape == data.LARGE_SHAPE:
        pytest.skip("torch: the chunked plain-torch oracle at 1080p would take tens of minutes")
    data.skip_large(shape, (provider,), LARGE_DEFAULT, "about the 1080p patch_match time plus VGG")

    target, ref = data.real_images(shape)
    lr = data.bicubic(target, 0.25)
    extractor = data.vgg()
    if provider in BACKENDS:
        def fn():
            return sw.texture_swap(lr, ref, extractor=extractor, backend=provider)
    else:
        def fn(stage=PEER_STAGES[provider]):
            return peers.peer_texture_swap(lr, ref, extractor, *stage)
    bench.run(fn, group=f"texture_swap {shape} real", provider=provider, shape=shape, features="real",
              n_query=n, n_key=n, rounds=ROUNDS[shape], flops=sw.similarity_flops(n, n, data.CHANNELS))



# ---------------------------------------------------------------------------------------------
# the whole super-resolution: generator + swap stage, and the `srntt sr` process

SR_PROVIDERS = ("optimized", "compiled", "bf16", "straightforward", "ttsr")
SR_LARGE_DEFAULT: set = set()  # 1080p SR is opt-in: SRNTT_BENCH_LARGE=1
SR_ROUNDS = {"cufed5": 3, "1080p": 1}
SGEMM_N = 2048
# This machine's sgemm at 2 threads when idle (docs/benchmarks.md): a loaded row is normalized by
# the sgemm measured around it, as ``normalized_s`` = best x sgemm_gflops / IDLE_SGEMM_GFLOPS.
IDLE_SGEMM_GFLOPS = 330.0


_MEMO: dict = {}


def _memo(key, make):
    # NB: the ``data`` namespace is not hashable, so functools.cache cannot key on it.
    if key not in _MEMO:
        _MEMO[key] = make()
    return _MEMO[key]


def _generator(data):
    return _memo("generator", lambda: infer.load_model(device=data.DEVICE))


def _sr_inputs(data, shape):
    """(lr (3, h, w), ref (3, 4h', 4w')): LR = bicubic x1/4 of the target half, the other half as Ref."""
    def make():
        target, ref = data.real_images(shape)
        return data.bicubic(target, 0.25)[0], ref[0]

    return _memo(("inputs", shape), make)


def _sr_fn(data, shape, provider):
    """The whole SR, untiled below 1080p (one tile shape, as a compiled generator wants), else in
    128-pixel LR tiles."""
    model, (lr, ref) = _generator(data), _sr_inputs(data, shape)
    tile = 128 if shape == data.LARGE_SHAPE else None
    options = {"optimized": {}, "compiled": {"compile": True}, "bf16": {"precision": "medium"},
               "straightforward": {"fast": False}}
    if provider in options:
        return lambda: infer.super_resolve(model, lr, [ref], tile=tile, **options[provider])
    extractor = data.vgg()

    def ttsr():
        maps, _, _ = peers.peer_texture_swap(lr[None], ref[None], extractor, peers.ttsr_patch_match,
                                             peers.ttsr_fold_swap)
        return ((model(lr[None] * 2 - 1, maps) + 1) / 2).clamp(0, 1)[0]

    return ttsr


def _sr_reference_output(data, shape):
    def make():
        with torch.no_grad():
            return _sr_fn(data, shape, "straightforward")()

    return _memo(("straightforward", shape), make)


def _sr_flops(data, shape) -> float:
    """FLOPs of the SR (torch's FlopCounterMode: convolutions, matmuls), for GFLOP/s; counted with
    oneDNN off (NB: FlopCounterMode does not see the fused oneDNN convolutions; the plain ones are
    the same convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    def make():
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False), counter:
            _sr_fn(data, shape, "optimized")()
        return float(counter.get_total_flops())

    return _memo(("flops", shape), make)


def _sgemm_gflops(device: torch.device) -> float:
    """The best of 3 ``SGEMM_N``-cube matmuls, in GFLOP/s, now."""
    a, b = (torch.randn(SGEMM_N, SGEMM_N, device=device) for _ in range(2))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * SGEMM_N**3 / best / 1e9


def _normalized(bench, device: torch.device, run) -> None:
    """``run()`` (a ``bench.run``) between two sgemm measurements; their mean normalizes its best time:
    on a shared machine the load moves between rows, so each row carries its own."""
    before = _sgemm_gflops(device)
    run()
    after = _sgemm_gflops(device)
    info = bench.benchmark.extra_info
    info["sgemm_gflops_around"] = [round(before, 1), round(after, 1)]
    if device.type == "cpu":
        best = bench.benchmark.stats.stats.min
        info["normalized_s"] = round(best * (before + after) / 2 / IDLE_SGEMM_GFLOPS, 3)


def test_sgemm(bench, data):
    """The device's sgemm speed in this run: SR times normalize by it (the machine is shared)."""
    a, b = (torch.randn(SGEMM_N, SGEMM_N, device=data.DEVICE) for _ in range(2))
    bench.run(lambda: a @ b, group="sgemm", provider="torch.mm", shape="cufed5", features="random",
              n_query=SGEMM_N, n_key=SGEMM_N, rounds=10, warmup=2, flops=2.0 * SGEMM_N**3)


@pytest.mark.parametrize("provider", SR_PROVIDERS)
def test_super_resolve(bench, data, shape, provider):
    """x4 SR of the LR half with the other half as reference, on the benchmark device: the optimized
    path (BN folded once per model, reference features once, channels-last, Winograd / fused
    convolutions), the same compiled by
    inductor (CUDA graphs on a GPU; its first call, the compile, is timed apart as ``compile_s``), the
    same with bfloat16 networks and the bf16 match (GPU only), the straightforward one (same weights,
    BN unfolded, NCHW, plain torch ops), and a TTSR-style pipeline (bmm relevance matrix + fold swaps,
    same VGG and generator)."""
    if shape not in SR_ROUNDS:
        pytest.skip(f"super_resolve runs at {', '.join(SR_ROUNDS)}")
    if provider == "bf16" and data.DEVICE.type != "cuda":
        pytest.skip("bf16: bfloat16 networks are a GPU option (this CPU has no bf16 matrix units)")
    h, w = data.SHAPES[shape]
    n = (h - 2) * (w - 2)
    if provider == "ttsr":
        data.skip_if_too_big(peers.ttsr_patch_match_bytes(n, n, data.CHANNELS), "the N x N relevance matrix")
    data.skip_large(shape, (provider,), SR_LARGE_DEFAULT, "several minutes per provider")
    fn = _sr_fn(data, shape, provider)
    info = {}
    if provider == "compiled":
        import torch._dynamo

        torch._dynamo.reset()
        t0 = time.perf_counter()
        fn()
        if data.DEVICE.type == "cuda":
            torch.cuda.synchronize()
        info["compile_s"] = round(time.perf_counter() - t0, 2)
    flops, outs = _sr_flops(data, shape), []
    _normalized(bench, data.DEVICE, lambda: outs.append(bench.run(
        fn, group=f"super_resolve {shape} real", provider=provider, shape=shape, features="real", n_query=n,
        n_key=n, rounds=SR_ROUNDS[shape], flops=flops, **info)))
    out = outs[0]
    bench.benchmark.extra_info["max_abs_diff_vs_straightforward"] = float(
        (out - _sr_reference_output(data, shape)).abs().max())


def test_sr_process(bench, data, tmp_path):
    """``srntt sr`` as a user runs it (CUFED5 size: 125x83 LR, 500x332 reference), start-up included."""
    from srntt_core.models.data import save_image

    lr, ref = _sr_inputs(data, "cufed5")
    save_image(lr, tmp_path / "lr.png")
    save_image(ref, tmp_path / "ref.png")
    cmd = [sys.executable, "-m", "srntt_core", "sr", str(tmp_path / "lr.png"),
           "--ref", str(tmp_path / "ref.png"), "-o", str(tmp_path / "sr.png"), "--overwrite"]

    def run():
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)

    _normalized(bench, data.DEVICE, lambda: bench.run(
        run, group="srntt sr process cufed5", provider="srntt sr", shape="cufed5", features="real",
        n_query=0, n_key=0, rounds=3))


def test_import_process(bench, data):
    """Start-up alone: a Python process that imports ``srntt_core.swap``."""
    cmd = [sys.executable, "-c", "import srntt_core.swap"]
    _normalized(bench, data.DEVICE, lambda: bench.run(
        lambda: subprocess.run(cmd, check=True, capture_output=True, timeout=600),
        group="srntt sr process cufed5", provider="import srntt_core.swap", shape="cufed5",
        features="random", n_query=0, n_key=0, rounds=3))
