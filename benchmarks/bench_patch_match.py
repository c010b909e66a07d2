"""patch_match: every srntt backend against every peer, on the same inputs, in one run.

3x3 patches, stride 1, SRNTT's valid grid (padding 0), 256 relu3_1 channels, one reference.
Providers: the project's backends (``cpu``, ``torch``; ``cuda``/``triton`` on a GPU) and the peers
of ``peers.py``: faiss ``IndexFlatIP``, TTSR's full ``bmm``, SRNTT's chunked ``conv2d``.
``extra_info``: equivalent 2304-d GFLOP/s (2 Nq Nk C 9 / best time), peak memory, and, at the
smaller shapes, how many of the provider's indices agree with the ``cpu`` backend's
(``index_agreement``) and the largest score difference (``score_max_diff``): a cheap check that
every competitor solves the same problem.
"""

from __future__ import annotations

import functools
import os

import peers
import pytest
import torch

import srntt_core.swap as sw
from srntt_core.ops import dispatch

BACKENDS = list(dispatch.BACKENDS)
PEERS = {
    "faiss": (peers.faiss_patch_match, peers.faiss_patch_match_bytes),
    "ttsr_bmm": (peers.ttsr_patch_match, peers.ttsr_patch_match_bytes),
    "srntt_conv2d": (peers.srntt_conv_patch_match, peers.srntt_conv_patch_match_bytes),
}
# At 1080p the direct method is ~7.6e13 FLOPs (minutes per call): by default only the cpu
# backend on real features runs there; SRNTT_BENCH_LARGE=1 adds the peers that fit.
LARGE_DEFAULT = {("cpu", "real")}
ROUNDS = {"train": 5, "cufed5": 3, "1080p": 1}
# The plain-torch oracle is chunked but not fast: one round where a call takes many seconds.
SLOW_ROUNDS = {"torch": 1, "srntt_conv2d": 2}
# Sustained sgemm throughput of a small CPU, for the opt-in estimates in skip messages.
SGEMM_GFLOPS = 180.0
# SRNTT_BENCH_PRECISIONS=highest,high,medium times the backends at each precision (the peers have
# one fixed precision and run only at "highest").
PRECISIONS = [p for p in os.environ.get("SRNTT_BENCH_PRECISIONS", "highest").replace(" ", "").split(",") if p]


@functools.cache
def _reference(shape, features, match_inputs):
    query, key = match_inputs(shape, features)
    with torch.no_grad():
        return sw.patch_match(query, key)


def _unavailable(provider: str, device: torch.device) -> str | None:
    if provider in BACKENDS:
        reasons = dispatch.get(provider).not_supported_reasons(device)
        return f"{provider}: {'; '.join(reasons)}" if reasons else None
    if provider == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "faiss: not installed (pip install faiss-cpu)"
        if device.type != "cpu":
            return "faiss: faiss-cpu searches CPU arrays only"
    return None


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("provider", BACKENDS + list(PEERS))
def test_patch_match(bench, data, shape, features, provider, precision):
    reason = _unavailable(provider, data.DEVICE)
    if reason:
        pytest.skip(reason)
    if provider in PEERS and precision != "highest":
        pytest.skip(f"{provider}: one fixed precision, timed at 'highest'")
    h, w = data.SHAPES[shape]
    n = (h - 2) * (w - 2)
    flops = sw.similarity_flops(n, n, data.CHANNELS)
    if provider in PEERS:
        data.skip_if_too_big(PEERS[provider][1](n, n, data.CHANNELS), f"{provider} working set")
    if provider == "torch" and shape == data.LARGE_SHAPE:
        pytest.skip("torch: the chunked plain-torch oracle at 1080p would take tens of minutes")
    if provider in PEERS:
        estimate = f"direct method ~{flops / SGEMM_GFLOPS / 1e9 / 60:.0f} min at {SGEMM_GFLOPS:.0f} GFLOP/s"
    else:
        estimate = "the same kernel as on real features, another 1-3 min"
    data.skip_large(shape, (provider, features), LARGE_DEFAULT, estimate)

    query, key = data.match_inputs(shape, features)
    if provider in BACKENDS:
        def fn():
            return sw.patch_match(query, key, backend=provider, precision=precision)
    else:
        def fn(match=PEERS[provider][0]):
            return match(query, key)
    rounds = ROUNDS[shape]
    if shape != "train":
        rounds = min(rounds, SLOW_ROUNDS.get(provider, rounds))
    index, score = bench.run(fn, group=f"patch_match {shape} {features}", provider=provider, shape=shape,
                             features=features, n_query=n, n_key=n, rounds=rounds, flops=flops,
                             precision=precision)
    if shape != data.LARGE_SHAPE:
        ref = _reference(shape, features, data.match_inputs)
        agree = (index.cpu() == ref.index.cpu()).double().mean().item()
        bench.benchmark.extra_info["index_agreement"] = round(agree, 5)
        bench.benchmark.extra_info["score_max_diff"] = float((score.cpu() - ref.score.cpu()).abs().max())
