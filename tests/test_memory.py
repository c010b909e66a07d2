"""docs/CONTRACT.md §5 (memory): no backend allocates N_query x N_key. A match whose full float32 similarity
matrix would be over 1 GiB runs with a small peak memory growth, on every CPU backend.

The peak is measured in a fresh Python process (benchmarks/peak_memory.py: the resident high-water
mark over the call, after a warm-up call; tracemalloc does not see torch's allocations).
"""

import textwrap
from pathlib import Path

import peak_memory
import pytest
from conftest import cpu_backends_available

ROOT = Path(__file__).parents[1]
QUERY, KEY, CHANNELS = (131, 133), (133, 131), 4
LIMIT_MB = 300

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{tests!r}, {benchmarks!r}]
    import torch
    import peak_memory
    import srntt_core.swap as sw
    from oracle import dense_similarity

    backend, (qh, qw, kh, kw, c) = {backend!r}, {sizes!r}
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, c, qh, qw, generator=g).clamp_min(-0.3)
    key = torch.randn(1, c, kh, kw, generator=g).clamp_min(-0.3)
    sw.patch_match(query[..., :9, :9], key[..., :9, :9], backend=backend)  # warm-up: lazy inits

    out = []
    growth = peak_memory.peak_bytes(lambda: out.append(sw.patch_match(query, key, backend=backend)))
    match = out[0]

    # Spot-check the answer exactly (float64) on a few query cells.
    cells = torch.randperm(match.index.numel(), generator=g)[:16]
    sims = dense_similarity(query, [key], 3, 1, 0, cells=cells)[0]
    best = sims.max(dim=1).values
    chosen = sims.gather(1, match.index.flatten()[cells, None])[:, 0]
    print(json.dumps({{"growth_mb": growth / 2**20, "shortfall": (best - chosen).max().item(),
                       "score_err": (best - match.score.flatten()[cells].double()).abs().max().item(),
                       "shape": list(match.index.shape)}}))
""")


@pytest.mark.skipif(not peak_memory.supported(), reason="needs Linux, glibc and /proc/self/clear_refs")
@pytest.mark.parametrize("name", ["cpu", "torch"])
def test_patch_match_peak_memory_is_small(name):
    if name not in cpu_backends_available():
        pytest.skip(f"backend {name!r} cannot run here")
    n_query = (QUERY[0] - 2) * (QUERY[1] - 2)
    n_key = (KEY[0] - 2) * (KEY[1] - 2)
    assert n_query * n_key * 4 > 2**30  # the full similarity matrix would be over 1 GiB
    code = SCRIPT.format(tests=str(ROOT / "tests"), benchmarks=str(ROOT / "benchmarks"), backend=name,
                         sizes=(*QUERY, *KEY, CHANNELS))
    result = peak_memory.run_child(code, cwd=str(ROOT), timeout=300)
    assert result["shape"] == [1, QUERY[0] - 2, QUERY[1] - 2]
    assert result["shortfall"] <= 1e-5 and result["score_err"] <= 1e-5, result
    assert result["growth_mb"] < LIMIT_MB, (
        f"{name}: peak memory grew by {result['growth_mb']:.0f} MB for a match whose full similarity matrix "
        f"is {n_query * n_key * 4 / 2**30:.2f} GiB")
