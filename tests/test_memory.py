"""docs/CONTRACT.md §5 (memory): no backend allocates N_query x N_key. A match whose full float32 similarity
matrix would be over 1 GiB runs with a small peak RSS growth, on every CPU backend.

Peak RSS is measured in a fresh Python process (tracemalloc does not see torch's allocations):
``ru_maxrss`` after a warm-up call, then again after the large call.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import cpu_backends_available

ROOT = Path(__file__).parents[1]
QUERY, KEY, CHANNELS = (131, 133), (133, 131), 4
LIMIT_MB = 300

SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    import srntt_core.swap as sw

    backend, (qh, qw, kh, kw, c) = sys.argv[1], map(int, sys.argv[2:7])
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, c, qh, qw, generator=g).clamp_min(-0.3)
    key = torch.randn(1, c, kh, kw, generator=g).clamp_min(-0.3)
    sw.patch_match(query[..., :9, :9], key[..., :9, :9], backend=backend)  # warm-up: lazy inits

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    before = rss_mb()
    match = sw.patch_match(query, key, backend=backend)
    after = rss_mb()

    # Spot-check the answer exactly (float64) on a few query cells.
    unfold = torch.nn.functional.unfold
    k = unfold(key.double(), 3)[0]
    k = k / k.norm(dim=0).clamp_min(1e-12)
    q = unfold(query.double(), 3)[0]
    cells = torch.randperm(q.shape[1], generator=g)[:16]
    sims = (q[:, cells] / q[:, cells].norm(dim=0)).T @ k
    best = sims.max(dim=1).values
    chosen = sims.gather(1, match.index.flatten()[cells, None])[:, 0]
    print(json.dumps({"growth_mb": after - before, "shortfall": (best - chosen).max().item(),
                      "score_err": (best - match.score.flatten()[cells].double()).abs().max().item(),
                      "shape": list(match.index.shape)}))
""")


@pytest.mark.parametrize("name", ["cpu", "torch"])
def test_patch_match_peak_memory_is_small(name):
    if name not in cpu_backends_available():
        pytest.skip(f"backend {name!r} cannot run here")
    n_query = (QUERY[0] - 2) * (QUERY[1] - 2)
    n_key = (KEY[0] - 2) * (KEY[1] - 2)
    assert n_query * n_key * 4 > 2**30  # the full similarity matrix would be over 1 GiB
    args = [str(v) for v in (*QUERY, *KEY, CHANNELS)]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, name, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "SRNTT_BACKEND": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, QUERY[0] - 2, QUERY[1] - 2]
    assert result["shortfall"] <= 1e-5 and result["score_err"] <= 1e-5, result
    assert result["growth_mb"] < LIMIT_MB, (
        f"{name}: peak RSS grew by {result['growth_mb']:.0f} MB for a match whose full similarity matrix "
        f"is {n_query * n_key * 4 / 2**30:.2f} GiB")

