"""Top-k patch matching: ``patch_match(..., k=K)`` on the project's backends against the peers' way,
``torch.topk`` over a ``bmm`` of normalized unfolded patches (DATSR's ``topk_feature_match_index``
computes the same full N_query x N_key similarity with ``conv2d``), on the same inputs, in one run.

3x3 patches, stride 1, valid grid, 256 relu3_1 channels, K = 2, 4, 8; the 1080p shape is left out
(the peer needs 1080p's 1.7e10-entry similarity). ``extra_info``: peak memory (``peak_mem_mb``) and
how many of the provider's K indices agree with the ``cpu`` backend's (``index_agreement``).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import srntt_core.swap as sw
from srntt_core.ops import dispatch

KS = [2, 4, 8]
BACKENDS = list(dispatch.BACKENDS)
ROUNDS = {"train": 3, "cufed5": 1}


def bmm_topk(query: torch.Tensor, key: torch.Tensor, k: int):
    """The peers' top-k: every pair's cosine in one (B, Nq, Nk) tensor, then ``torch.topk``."""
    q = F.unfold(query, 3)
    kp = F.unfold(key, 3)
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
    kp = kp / kp.norm(dim=1, keepdim=True).clamp_min(1e-12)
    score, index = torch.bmm(q.transpose(1, 2), kp).topk(k, dim=2)
    gh, gw = query.shape[-2] - 2, query.shape[-1] - 2
    return sw.PatchMatch(index.view(-1, gh, gw, k), score.view(-1, gh, gw, k))


@functools.cache
def _reference(shape, features, k, match_inputs):
    query, key = match_inputs(shape, features)
    with torch.no_grad():
        return sw.patch_match(query, key, k=k)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("provider", [*BACKENDS, "bmm_topk"])
def test_patch_match_topk(bench, data, shape, features, provider, k):
    if shape == data.LARGE_SHAPE:
        pytest.skip("top-k: the bmm peer's full similarity does not fit at 1080p")
    if provider in BACKENDS:
        reasons = dispatch.get(provider).not_supported_reasons(data.DEVICE)
        reasons += dispatch.get(provider).topk_not_supported_reasons(data.DEVICE)
        if reasons:
            pytest.skip(f"{provider}: {'; '.join(reasons)}")
    h, w = data.SHAPES[shape]
    n = (h - 2) * (w - 2)
    if provider == "bmm_topk":
        data.skip_if_too_big(4 * n * n + 2 * 4 * n * 9 * data.CHANNELS, "bmm_topk similarity")
    query, key = data.match_inputs(shape, features)
    if provider in BACKENDS:
        def fn():
            return sw.patch_match(query, key, backend=provider, k=k)
    else:
        def fn():
            return bmm_topk(query, key, k)
    index, score = bench.run(fn, group=f"patch_match top-{k} {shape} {features}", provider=provider,
                             shape=shape, features=features, n_query=n, n_key=n, rounds=ROUNDS[shape],
                             flops=sw.similarity_flops(n, n, data.CHANNELS), k=k)
    ref = _reference(shape, features, k, data.match_inputs)
    bench.benchmark.extra_info["index_agreement"] = round(
        (index.cpu() == ref.index.cpu()).double().mean().item(), 5)
    bench.benchmark.extra_info["score_max_diff"] = float((score.cpu() - ref.score.cpu()).abs().max())
