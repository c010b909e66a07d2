"""texture_swap end to end: VGG19 (three passes) + relu3_1 match + swaps at three levels.

Real images only (the two halves of a Sun80 image, LR = bicubic x1/4 of the target half).
Providers: ``srntt_core.swap.texture_swap`` on each backend, and the same stage built from the
peers: ``ttsr`` (unfold + bmm match, gather + fold swap) and ``srntt`` (chunked conv2d match,
Python-loop swap). All share one VGG19 extractor, so the differences are the match and the swap.
"""

from __future__ import annotations

import peers
import pytest

import srntt_core.swap as sw
from srntt_core import dispatch

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

