"""feature_swap: every srntt backend against TTSR's gather + fold and SRNTT's Python loop.

The three SRNTT levels (relu3_1 x1, 256 ch; relu2_1 x2, 128 ch; relu1_1 x4, 64 ch), 3x3 patches on
the valid grid, ``reduce="mean"`` everywhere (the peers divide by the true overlap count too).
``real``: the reference's VGG features and the index of the real relu3_1 match; ``random``:
normal values and a uniform random index (no locality: the worst case for caches).
``extra_info``: ``gbps`` = bytes of the gathered windows (N_query * Cv * (3s)^2 * 4) / best time,
peak memory, and ``max_abs_diff`` against the ``torch`` backend where both ran.
"""

from __future__ import annotations

import functools

import peers
import pytest
import torch

import srntt_core.swap as sw
from srntt_core.ops import dispatch

BACKENDS = list(dispatch.BACKENDS)
PEERS = {"ttsr_fold": peers.ttsr_fold_swap, "python_loop": peers.python_loop_swap}
LEVELS = tuple(sw.LEVELS)
# The real index at 1080p needs the 1080p match (minutes); by default 1080p runs the random index.
LARGE_DEFAULT = {(p, "random") for p in BACKENDS + list(PEERS)}
ROUNDS = {"train": 5, "cufed5": 3, "1080p": 1}


@functools.cache
def _reference(shape, features, level, swap_values, swap_index, scale):
    with torch.no_grad():
        return sw.feature_swap(swap_values(shape, features)[level], swap_index(shape, features),
                               scale=scale, backend="torch")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("provider", BACKENDS + list(PEERS))
def test_feature_swap(bench, data, shape, features, level, provider):
    if provider in BACKENDS:
        reasons = dispatch.get(provider).not_supported_reasons(data.DEVICE)
        if reasons:
            pytest.skip(f"{provider}: {'; '.join(reasons)}")
    scale, cv = data.LEVELS[level]
    h, w = data.SHAPES[shape]
    n = (h - 2) * (w - 2)
    if provider == "ttsr_fold":
        data.skip_if_too_big(peers.ttsr_fold_swap_bytes(n, n, cv, scale=scale),
                             "unfolded values + gathered columns")
    data.skip_large(shape, (provider, features), LARGE_DEFAULT,
                    "the real 1080p index needs the 1080p match first")

    values, index = data.swap_values(shape, features)[level], data.swap_index(shape, features)
    if provider in BACKENDS:
        def fn():
            return sw.feature_swap(values, index, scale=scale, backend=provider)
    else:
        def fn(swap=PEERS[provider]):
            return swap(values, index, scale=scale)
    nbytes = n * cv * (3 * scale) ** 2 * values.element_size()
    out = bench.run(fn, group=f"feature_swap {shape} {features} {level}", provider=provider, shape=shape,
                    features=features, n_query=n, n_key=n, rounds=ROUNDS[shape], nbytes=nbytes,
                    level=level, scale=scale, value_channels=cv)
    if shape != data.LARGE_SHAPE:
        ref = _reference(shape, features, level, data.swap_values, data.swap_index, scale)
        bench.benchmark.extra_info["max_abs_diff"] = float((out.cpu() - ref.cpu()).abs().max())
