"""The test oracle: float64 ground truth for patch_match and feature_swap, and the comparisons of
docs/CONTRACT.md §4. Every test that checks a kernel's answer uses this module.

- :func:`dense_similarity`: the (B, Nq, Nk) float64 cosine matrix over the concatenated key grids;
  :func:`exact_match` adds the exact best index (the ``torch`` backend run in float64, checked
  against the dense matrix), best score and top-2 margin (small shapes only).
- :func:`assert_match`: a backend's (index, score) against :class:`Exact`: indices equal where the
  exact top-2 margin exceeds the tolerance, the chosen key's exact score within the tolerance of
  the exact maximum everywhere, the returned score close to the exact one.
- :func:`feature_swap`: docs/CONTRACT.md §3 by unfold / gather / fold in float64, differentiable
  with respect to the values; :func:`literal_feature_swap` writes the same contract as Python
  loops over cells, to check the oracle itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from srntt_core.ops import torch_backend
from srntt_core.ops.geometry import EPS, grid_size

# docs/CONTRACT.md §4: the chosen key's exact score is within this of the exact maximum.
PRECISION_TOL = {"highest": 1e-5, "high": 1e-3, "medium": 2e-3}
TOL = PRECISION_TOL["highest"]
grid = grid_size


def _as_list(x) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


# ---------------------------------------------------------------------------------------------
# patch_match

@dataclass
class Exact:
    """float64 ground truth for one patch_match problem (small shapes only)."""

    index: torch.Tensor  # (B, Gh, Gw) from the float64 torch backend
    score: torch.Tensor  # (B, Gh, Gw) exact best score
    margin: torch.Tensor  # (B, Gh, Gw) exact top-1 minus top-2 score (inf with a single key patch)
    sim: torch.Tensor  # (B, Nq, Nk) dense float64 cosine similarities

    def chosen(self, index: torch.Tensor) -> torch.Tensor:
        """Exact score of the key patch that ``index`` names, per query cell."""
        b = index.shape[0]
        idx = index.to(self.sim.device).reshape(b, -1, 1)
        return self.sim.gather(2, idx).view(self.score.shape)


def dense_similarity(query, keys, patch_size, stride, padding, cells=None) -> torch.Tensor:
    """(B, Nq, Nk) float64 cosine similarity over the concatenated key grids (test sizes only);
    with ``cells`` (flat query cell numbers), only those rows: (B, len(cells), Nk)."""
    def unit(x):
        d = F.unfold(x.detach().double().cpu(), patch_size, padding=padding, stride=stride)
        return d / d.norm(dim=1, keepdim=True).clamp_min(EPS)

    q = unit(query) if cells is None else unit(query)[:, :, cells]
    return torch.bmm(q.transpose(1, 2), torch.cat([unit(k) for k in _as_list(keys)], dim=2))


def exact_match(query, keys, patch_size=3, stride=1, padding=0) -> Exact:
    keys = _as_list(keys)
    q64 = query.detach().double().cpu()
    k64 = [k.detach().double().cpu() for k in keys]
    index, score = torch_backend.patch_match(q64.contiguous(), [k.contiguous() for k in k64],
                                             patch_size, stride, padding)
    sim = dense_similarity(q64, k64, patch_size, stride, padding)
    shape = index.shape
    if sim.shape[2] > 1:
        top2 = sim.topk(2, dim=2).values
        margin = (top2[..., 0] - top2[..., 1]).view(shape)
    else:
        margin = torch.full(shape, float("inf"), dtype=torch.float64)
    exact = Exact(index, sim.max(dim=2).values.view(shape), margin, sim)
    # The oracle must agree with the dense computation it is checked against.
    torch.testing.assert_close(score, exact.score, atol=1e-12, rtol=0)
    assert (exact.score - exact.chosen(index)).max().item() <= 1e-12
    return exact


def assert_match(result, exact: Exact, tol: float = TOL, *, margin: float | None = None,
                 score_tol: float | None = None) -> None:
    """docs/CONTRACT.md §4 comparison of a backend's ``(index, score)`` (or a result with those
    attributes) against the float64 oracle.

    Indices must equal the exact ones where the exact top-2 margin exceeds ``margin`` (default
    ``tol``); everywhere, the chosen key's exact score is within ``tol`` of the exact maximum. The
    returned score is compared with the exact maximum within ``tol``, or, with ``score_tol``, with
    the chosen key's exact score within ``score_tol``.
    """
    index, score = (result.index, result.score) if hasattr(result, "score") else result
    index, score = index.cpu(), score.detach().cpu()
    margin = tol if margin is None else margin
    assert index.dtype == torch.int64, index.dtype
    assert index.shape == exact.index.shape and score.shape == exact.index.shape
    assert index.min().item() >= 0 and index.max().item() < exact.sim.shape[2]
    sure = exact.margin > margin
    mismatch = (index != exact.index) & sure
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} indices differ where the exact top-2 margin > {margin}: "
        f"got {index[mismatch][:5].tolist()}, exact {exact.index[mismatch][:5].tolist()}")
    chosen = exact.chosen(index)
    worst = (exact.score - chosen).max().item()
    assert worst <= tol, f"chosen key's exact score is {worst:.3g} below the exact max"
    if score_tol is None:
        torch.testing.assert_close(score.double(), exact.score, atol=tol, rtol=0)
    else:
        torch.testing.assert_close(score.double(), chosen, atol=score_tol, rtol=0)


def first_copies(keys, patch_size, stride, padding) -> torch.Tensor:
    """(B, Nk): for every key patch, the smallest index of a bitwise-identical key patch (the answer
    ties must give)."""
    desc = torch.cat([F.unfold(k.detach().cpu(), patch_size, padding=padding, stride=stride)
                      for k in _as_list(keys)], dim=2)  # B, D, Nk
    return torch.stack([(d.T[:, None, :] == d.T[None, :, :]).all(-1).int().argmax(1) for d in desc])


# ---------------------------------------------------------------------------------------------
# feature_swap

def default_out_size(q_grid, patch_size, stride, padding, scale) -> tuple[int, int]:
    """The default output size of feature_swap for a (Gq_h, Gq_w) index."""
    return tuple(((g - 1) * stride + patch_size - 2 * padding) * scale for g in q_grid)


def feature_swap(values, index, patch_size=3, stride=1, padding=0, scale=1, out_size=None,
                 reduce="mean") -> torch.Tensor:
    """docs/CONTRACT.md §3 by unfold / gather / fold on a canvas of every output window, in float64
    on the CPU; differentiable with respect to float64 CPU ``values``."""
    values = [v.double().cpu() for v in _as_list(values)]
    index = index.cpu().long()
    win, step, off = patch_size * scale, stride * scale, padding * scale
    b = values[0].shape[0]
    gqh, gqw = index.shape[-2:]
    out_h, out_w = out_size or default_out_size((gqh, gqw), patch_size, stride, padding, scale)
    # The value window of key cell (u, v) starts at (u*stride - padding)*scale, so unfolding with
    # padding*scale yields exactly the key grid (a leftover beyond key map * scale adds no window).
    cols = torch.cat([F.unfold(v, win, padding=off, stride=step) for v in values], dim=2)
    taken = cols.gather(2, index.reshape(b, 1, -1).expand(-1, cols.shape[1], -1))
    canvas = ((gqh - 1) * step + win, (gqw - 1) * step + win)  # output window i starts at i*step - off
    summed = F.fold(taken, canvas, win, stride=step)
    count = F.fold(torch.ones_like(taken[:1, :win * win]), canvas, win, stride=step)

    def crop(x):  # output pixel y is canvas row y + off; rows beyond the canvas are zero
        x = F.pad(x, (0, max(0, out_w + off - canvas[1]), 0, max(0, out_h + off - canvas[0])))
        return x[..., off:off + out_h, off:off + out_w]

    out, count = crop(summed), crop(count)
    if reduce == "mean":
        out = torch.where(count > 0, out / count.clamp(min=1), torch.zeros_like(out))
    return out


def literal_feature_swap(values, index, patch_size=3, stride=1, padding=0, scale=1, out_size=None,
                         reduce="mean") -> torch.Tensor:
    """docs/CONTRACT.md §3 written as literally as possible (Python loops over cells, float64)."""
    values = [v.detach().double().cpu() for v in _as_list(values)]
    index = index.cpu()
    b, cv = values[0].shape[:2]
    gqh, gqw = index.shape[-2:]
    win, step, pad = patch_size * scale, stride * scale, padding * scale
    oh, ow = out_size or default_out_size((gqh, gqw), patch_size, stride, padding, scale)
    cells = []  # flat key cell -> (reference, u, v)
    for r, v in enumerate(values):
        gkh = grid(v.shape[-2] // scale, patch_size, stride, padding)
        gkw = grid(v.shape[-1] // scale, patch_size, stride, padding)
        cells += [(r, u, w) for u in range(gkh) for w in range(gkw)]
    out = torch.zeros(b, cv, oh, ow, dtype=torch.float64)
    count = torch.zeros(oh, ow, dtype=torch.float64)
    for bi in range(b):
        for i in range(gqh):
            for j in range(gqw):
                r, u, w = cells[int(index[bi, i, j])]
                src = values[r][bi]
                for dy in range(win):
                    for dx in range(win):
                        y, x = i * step - pad + dy, j * step - pad + dx
                        if not (0 <= y < oh and 0 <= x < ow):
                            continue
                        if bi == 0:
                            count[y, x] += 1
                        sy, sx = u * step - pad + dy, w * step - pad + dx
                        if 0 <= sy < src.shape[-2] and 0 <= sx < src.shape[-1]:
                            out[bi, :, y, x] += src[:, sy, sx]
    if reduce == "mean":
        out = torch.where(count > 0, out / count.clamp(min=1), 0.0)
    return out


def feature_swap_grads(values, index, grad_out, patch_size=3, stride=1, padding=0, scale=1, out_size=None,
                       reduce="mean") -> list[torch.Tensor]:
    """float64 gradient of :func:`feature_swap` with respect to each values tensor."""
    leaves = [v.detach().double().cpu().requires_grad_() for v in _as_list(values)]
    out = feature_swap(leaves, index, patch_size, stride, padding, scale, out_size, reduce)
    grads = torch.autograd.grad(out, leaves, grad_out.detach().double().cpu(), allow_unused=True)
    return [torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves, strict=True)]


def key_cells(values, patch_size=3, stride=1, padding=0, scale=1) -> int:
    """Key cells over the concatenated key grids of ``values`` (the bound of index values)."""
    return sum(grid(v.shape[-2] // scale, patch_size, stride, padding)
               * grid(v.shape[-1] // scale, patch_size, stride, padding) for v in _as_list(values))
