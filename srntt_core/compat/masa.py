"""MASA-SR-compatible coarse-to-fine matching and transfer on srntt-core's kernels.

Drop-in for the correspondence part of ``MASA`` (``models/archs/MASA_arch.py`` of MASA-SR): its
``search_org``, ``search`` and ``transfer`` methods and the block/window logic of its ``forward``
that turns the encoder features into ``warp_ref_l``. The published model:

1. cuts the LR features (level 1, replicate-padded by 1) into ``py x px`` blocks of ``ky x kx``
   pixels (``px = W // 8``, ``kx = W // px``), each carrying a one-pixel margin;
2. ``search``: for each block, the 3x3 patch at its centre, dilated by 1, 2 and 3, against every
   3x3 patch of the Ref↓ features with the same dilation (zero padding = dilation); the sum of the
   three cosines is maximized: one position per block;
3. crops around that position a window of ``(dy + 2) x (dx + 2)`` Ref↓ pixels
   (``dx = 2 * int(Wr // (2 px) * 1.5) + 1``), shifted inside the map at the borders, and the
   same window of the Ref features at x1, x2 and x4;
4. ``search_org``: inside the block, every 3x3 patch (valid grid of the padded block) against every
   3x3 patch of the window (valid grid), cosine, best one (``num_nbr = 1``);
5. ``transfer``: for each level s, the chosen 3s x 3s windows (stride s) of the cropped Ref
   features folded back into the block with padding s, divided by the number of windows that
   cover each pixel, times the best cosine resized bilinearly; blocks are put back in place.

Here (4) is :func:`srntt_core.swap.patch_match` with ``padding=0`` on the batch of blocks against
the batch of windows, and (5) is :func:`srntt_core.swap.feature_swap` with ``padding=1`` after an
index conversion: the window's valid-grid cell ``(i, j)`` reads window rows ``i .. i + 2``, which is
the level's padded-grid cell ``(y0 + i + 1, x0 + j + 1)``. All blocks go through one feature_swap per
level over the whole Ref level (no cropped windows): they are laid out with two spare cells after each,
so that no block's windows spill into another, then divided by the overlap count inside a block
(MASA's fold of ones). Neither the original's unfolded windows (``C * 144`` values per cell at x4)
nor its gathered columns exist. (2) has one query per block, so its score table is small; it is
computed by dilated ``conv2d`` without unfolding the reference.

``exact=True`` replaces the approximation by a full search: every LR pixel's patch against every
Ref↓ patch (one ``patch_match`` over the whole maps) and one transfer over the whole image. That
is what MASA computes with a single block whose window is the whole reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.geometry import EPS, grid_size
from ..ops.torch_backend import coverage_count
from ..swap import feature_swap, patch_match
from ._pairs import result_dtype

__all__ = ["MASAMethods", "MASAWarp", "masa_warp", "search", "search_org", "transfer"]

LEVEL_SCALES = (4, 2, 1)  # MASA's fea_ref_l / warp_ref_l order: x4 (level 1), x2, x1 (level 3)


def _check_map(name: str, t, dim: int = 4) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != dim or not t.is_floating_point():
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a floating-point {dim}-d tensor, got {shape}")
    return t


def _check_nbr(num_nbr) -> None:
    if num_nbr != 1:
        raise ValueError(f"num_nbr: only num_nbr=1 is supported (MASA's forward uses the best neighbour "
                         f"only), got {num_nbr!r}")


def search_org(lr: Tensor, reflr: Tensor, ks: int = 3, pd: int = 1, stride: int = 1, num_nbr: int = 1, *,
               backend: str = "auto", precision: str = "highest") -> tuple[Tensor, Tensor]:
    """MASA's ``search_org``: 3x3 patches on the valid grids, the best cosine and its index.

    ``lr`` (N, C, H, W), ``reflr`` (N, C, Hr, Wr). Returns ``(sorted_corr, ind_l)``, each
    (N, H - 2, W - 2, 1): the best cosine (input dtype) and its flat index over reflr's valid grid.
    ``pd`` is unused, as in MASA.
    """
    _check_map("lr", lr)
    _check_map("reflr", reflr)
    _check_nbr(num_nbr)
    if ks != 3 or stride != 1:
        raise ValueError(f"ks, stride: MASA's search_org reshapes to (H - 2, W - 2), so only ks=3, stride=1 "
                         f"work there, got ks={ks!r}, stride={stride!r}")
    m = patch_match(lr, reflr, patch_size=3, stride=1, padding=0, backend=backend, precision=precision)
    return m.score.to(result_dtype(lr, reflr)).unsqueeze(-1), m.index.unsqueeze(-1)


def _safe_sqrt(x: Tensor) -> Tensor:
    # NB: sqrt has an infinite derivative at 0; zero patches get norm 0 and a zero gradient.
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


def search(lr: Tensor, reflr: Tensor, ks: int = 3, pd: int = 1, stride: int = 1,
           dilations: Sequence[int] = (1, 2, 4), num_nbr: int = 1) -> tuple[Tensor, Tensor]:
    """MASA's ``search``: one dilated centre patch per block against the whole Ref↓, summed cosines.

    ``lr`` (N, P, C, ky, kx): the blocks; ``reflr`` (N, C, Hr, Wr). For each dilation d the block's
    3x3 patch around ``(ky // 2, kx // 2)`` with holes d is compared (cosine) with every 3x3 patch
    of ``reflr`` with holes d and zero padding d; the cosines of all dilations are summed. Returns
    ``(sorted_corr, ind_l)``, each (N, P, 1): the best sum and its flat position in (Hr, Wr).
    """
    _check_map("lr", lr, 5)
    _check_map("reflr", reflr)
    _check_nbr(num_nbr)
    if ks != 3 or stride != 1:
        raise ValueError(f"ks, stride: only ks=3, stride=1 are supported (MASA's), got {ks!r}, {stride!r}")
    n, p, c, ky, kx = lr.shape
    if reflr.shape[0] != n or reflr.shape[1] != c:
        raise ValueError(f"reflr: expected (N={n}, C={c}, Hr, Wr), got {tuple(reflr.shape)}")
    y, x = ky // 2, kx // 2
    dilations = list(dilations)
    largest = min(y, x, ky - 1 - y, kx - 1 - x)
    for d in dilations:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1 or d > largest:
            raise ValueError(f"dilations: each must be an int in [1, {largest}] for {ky}x{kx} blocks "
                             f"(the dilated centre patch must lie inside), got {d!r}")
    dtype = torch.float64 if torch.float64 in (lr.dtype, reflr.dtype) else torch.float32
    ref = reflr.to(dtype)
    sq = ref.pow(2).sum(1, keepdim=True)
    ones = sq.new_ones(1, 1, 3, 3)
    total = 0
    for d in dilations:
        q = lr[:, :, :, y - d:y + d + 1:d, x - d:x + d + 1:d].to(dtype)
        q = F.normalize(q.reshape(n, p, -1), dim=2).view(n, p, c, 3, 3)
        dots = torch.cat([F.conv2d(ref[i:i + 1], q[i], padding=d, dilation=d) for i in range(n)])
        k_norm = _safe_sqrt(F.conv2d(sq, ones, padding=d, dilation=d)).clamp_min(EPS)
        total = total + (dots / k_norm).flatten(2)
    best, index = total.max(dim=2)
    return best.to(result_dtype(lr, reflr)).unsqueeze(-1), index.unsqueeze(-1)


def _transfer_geometry(ks: int, pd: int, stride: int) -> tuple[int, int]:
    """MASA's fold (kernel ks, padding pd, stride s into s times the index grid) as
    ``(patch_size, padding)`` in cells of s pixels."""
    for name, v in (("ks", ks), ("pd", pd), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "pd" else 1):
            kind = "non-negative" if name == "pd" else "positive"
            raise ValueError(f"{name}: expected a {kind} int, got {v!r}")
    p, q = ks // stride, pd // stride
    if ks % stride or pd % stride or p != 2 * q + 1:
        raise ValueError(f"ks, pd, stride: the fold only gives back the index grid when ks = (2 pd / stride "
                         f"+ 1) * stride (MASA: 3/1/1, 6/2/2, 12/4/4), got ks={ks}, pd={pd}, stride={stride}")
    return p, q


def _swap(fea: Tensor, index: Tensor, soft_att: Tensor, p: int, q: int, s: int, backend: str) -> Tensor:
    """feature_swap of the valid-grid ``index`` (B, Hi, Wi) into fea's windows, times soft_att resized."""
    gw_valid = fea.shape[-1] // s - p + 1
    row = torch.div(index, gw_valid, rounding_mode="floor")
    padded = (row + q) * (gw_valid + 2 * q) + index % gw_valid + q
    hi, wi = index.shape[-2:]
    out = feature_swap(fea, padded, patch_size=p, stride=1, padding=q, scale=s, out_size=(hi * s, wi * s),
                       reduce="mean", backend=backend)
    att = F.interpolate(soft_att, size=(hi * s, wi * s), mode="bilinear", align_corners=False)
    return out * att.to(out.dtype)


def transfer(fea: Tensor, index: Tensor, soft_att: Tensor, ks: int = 3, pd: int = 1, stride: int = 1, *,
             backend: str = "auto") -> Tensor:
    """MASA's ``transfer``: the ``index``-chosen ks x ks windows (stride s) of ``fea`` folded into
    an (Hi s, Wi s) map with padding pd, divided by the windows covering each pixel, times
    ``soft_att`` (N, 1, Hi, Wi) resized bilinearly. ``index`` (N, Hi, Wi) is flat over fea's
    valid grid of windows. Differentiable with respect to ``fea`` and ``soft_att``.
    """
    _check_map("fea", fea)
    _check_map("soft_att", soft_att)
    p, q = _transfer_geometry(ks, pd, stride)
    if not isinstance(index, Tensor) or index.dim() != 3 or index.dtype not in (torch.int64, torch.int32):
        raise ValueError("index: expected an integer (N, Hi, Wi) tensor")
    gh, gw = (grid_size(side, ks, stride, 0) for side in fea.shape[-2:])
    if gh < 1 or gw < 1:
        raise ValueError(f"fea: a {tuple(fea.shape[-2:])} map is smaller than one {ks}x{ks} window")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= gh * gw):
        raise ValueError(f"index: values must be in [0, {gh * gw}) (fea's valid grid of windows)")
    if soft_att.shape[:2] != (index.shape[0], 1) or soft_att.shape[-2:] != index.shape[-2:]:
        raise ValueError(f"soft_att: expected (N, 1, {index.shape[-2]}, {index.shape[-1]}), "
                         f"got {tuple(soft_att.shape)}")
    return _swap(fea, index.long(), soft_att, p, q, stride, backend)


# ---------------------------------------------------------------------------------------------
# the block / window logic of MASA's forward

def _geometry(h: int, w: int, hr: int, wr: int, lr_block_size: int, ref_down_block_size: float):
    px, py = w // lr_block_size, h // lr_block_size
    if px < 1 or py < 1:
        raise ValueError(f"fea_lr: a {h}x{w} map is smaller than one {lr_block_size}-pixel block "
                         f"(MASA divides by zero there)")
    kx, ky = w // px, h // py
    if ky * py != h or kx * px != w:
        raise ValueError(f"fea_lr: {h}x{w} is not {py}x{px} blocks of {ky}x{kx} "
                         f"(lr_block_size={lr_block_size}); MASA's final view fails there")
    dx = 2 * int(wr // (2 * px) * ref_down_block_size) + 1
    dy = 2 * int(hr // (2 * py) * ref_down_block_size) + 1
    if dx + 2 > 2 * wr or dy + 2 > 2 * hr:
        raise ValueError(f"fea_reflr: a {hr}x{wr} map is too small for {dy + 2}x{dx + 2} windows "
                         f"(MASA's gather fails with an IndexError)")
    return py, px, ky, kx, dy, dx


def _window_start(pos: Tensor, diameter: int, size: int) -> Tensor:
    """First row (column) of the window of ``diameter + 2`` around ``pos``, shifted inside [0, size)."""
    start = (pos - diameter // 2 - 1).clamp_min(0)
    # NB: a window wider than the map starts below 0; MASA's gather then wraps around (Python
    # indexing), which _crop reproduces with a modulo and _blocks_swap with circular padding.
    return start.clamp_max(size - 2 - diameter)


def _crop(fea: Tensor, batch: Tensor, y0: Tensor, x0: Tensor, height: int, width: int) -> Tensor:
    """(len(batch), C, height, width) windows of ``fea`` at (y0, x0), indices wrapped like MASA's."""
    h, w = fea.shape[-2:]
    if bool((y0 >= 0).all() and (x0 >= 0).all() and (y0 + height <= h).all() and (x0 + width <= w).all()):
        return torch.stack([fea[b, :, y:y + height, x:x + width]
                            for b, y, x in zip(batch.tolist(), y0.tolist(), x0.tolist(), strict=True)])
    rows = (y0[:, None] + torch.arange(height, device=fea.device)) % h
    cols = (x0[:, None] + torch.arange(width, device=fea.device)) % w
    crops = fea[batch[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, height, width, C)
    return crops.permute(0, 3, 1, 2)


def _check_levels(fea_ref: Sequence[Tensor], n: int, hr: int, wr: int) -> list[Tensor]:
    if isinstance(fea_ref, Tensor) or len(fea_ref) != 3:
        raise ValueError("fea_ref: expected MASA's fea_ref_l, three maps [x4, x2, x1] of the Ref features")
    for i, (t, s) in enumerate(zip(fea_ref, LEVEL_SCALES, strict=True)):
        _check_map(f"fea_ref[{i}]", t)
        if t.shape[0] != n or t.shape[-2] < hr * s or t.shape[-1] < wr * s:
            raise ValueError(f"fea_ref[{i}]: expected (N={n}, C, >= {hr * s}, >= {wr * s}) ({s} times "
                             f"fea_reflr), got {tuple(t.shape)}")
    return list(fea_ref)


def masa_warp(fea_lr: Tensor, fea_reflr: Tensor, fea_ref: Sequence[Tensor], *, lr_block_size: int = 8,
              ref_down_block_size: float = 1.5, dilations: Sequence[int] = (1, 2, 3), exact: bool = False,
              backend: str = "auto", precision: str = "highest") -> list[Tensor]:
    """MASA's ``warp_ref_l`` from its encoder features.

    Args:
        fea_lr: (N, C, H, W) ``fea_lr_l[0]``; fea_reflr: (N, C, Hr, Wr) ``fea_reflr_l[0]``.
        fea_ref: ``fea_ref_l``: the Ref features at 4, 2 and 1 times fea_reflr's size.
        exact: full search instead of MASA's blocks and windows (see the module docstring).

    Returns:
        ``[warp_x4, warp_x2, warp_x1]``, (N, C_l, H s, W s) for s = 4, 2, 1, in fea_ref's dtype.
        Differentiable with respect to all inputs (the best cosine through the chosen pairs, the
        maps through the Ref features), as in MASA.
    """
    _check_map("fea_lr", fea_lr)
    _check_map("fea_reflr", fea_reflr)
    n, c, h, w = fea_lr.shape
    if fea_reflr.shape[:2] != (n, c):
        raise ValueError(f"fea_reflr: expected (N={n}, C={c}, Hr, Wr), got {tuple(fea_reflr.shape)}")
    hr, wr = fea_reflr.shape[-2:]
    levels = _check_levels(fea_ref, n, hr, wr)
    if exact:
        return _exact(fea_lr, fea_reflr, levels, backend, precision)
    py, px, ky, kx, dy, dx = _geometry(h, w, hr, wr, lr_block_size, ref_down_block_size)
    padded = F.pad(fea_lr, (1, 1, 1, 1), mode="replicate")
    blocks = padded.unfold(2, ky + 2, ky).unfold(3, kx + 2, kx)  # (N, C, py, px, ky + 2, kx + 2)
    blocks = blocks.permute(0, 2, 3, 1, 4, 5).reshape(n * py * px, c, ky + 2, kx + 2)
    _, centre = search(blocks.view(n, py * px, c, ky + 2, kx + 2), fea_reflr, dilations=dilations)
    centre = centre.reshape(-1)
    batch = torch.arange(n, device=fea_lr.device).repeat_interleave(py * px)
    y0 = _window_start(torch.div(centre, wr, rounding_mode="floor"), dy, hr)
    x0 = _window_start(centre % wr, dx, wr)
    windows = _crop(fea_reflr, batch, y0, x0, dy + 2, dx + 2)
    match = patch_match(blocks, windows, patch_size=3, stride=1, padding=0, backend=backend,
                        precision=precision)
    att = match.score.unsqueeze(1)
    return [_blocks_swap(fea, match.index, y0, x0, att, (n, py, px, ky, kx, dy, dx), s, backend)
            for fea, s in zip(levels, LEVEL_SCALES, strict=True)]


def _blocks_swap(fea: Tensor, index: Tensor, y0: Tensor, x0: Tensor, att: Tensor, geometry: tuple, s: int,
                 backend: str) -> Tensor:
    """MASA's per-block transfer at scale ``s``, as one feature_swap over the whole Ref level.

    The blocks' cells are laid out on a canvas with two spare cells after each block; a block's
    windows spill one cell (padding 1) into them, and the spare cells themselves point at a window of
    zeros, so the canvas sum holds each block's own fold. Each cell's window-local index becomes the
    padded-grid index of the same window in the whole level; the sum is divided by the overlap count
    inside one block (MASA's fold of ones) and multiplied by the block's resized best cosine.
    """
    n, py, px, ky, kx, dy, dx = geometry
    c = fea.shape[1]
    # NB: MASA's gather wraps negative window starts around the level (Python indexing); circular
    # padding on the top / left puts those rows and columns in front of the level.
    top, left = max(0, -int(y0.min())), max(0, -int(x0.min()))
    if top or left:
        fea = F.pad(fea, (left * s, 0, top * s, 0), mode="circular")
    hk, wk = fea.shape[-2] // s, fea.shape[-1] // s  # the level's padded key grid, one cell per s pixels
    row = (y0 + top).view(-1, 1, 1) + torch.div(index, dx, rounding_mode="floor") + 1
    col = (x0 + left).view(-1, 1, 1) + index % dx + 1
    canvas = index.new_full((n, py, ky + 2, px, kx + 2), hk * wk)  # hk * wk: the cell of zeros
    canvas[:, :, :ky, :, :kx] = (row * wk + col).view(n, py, px, ky, kx).permute(0, 1, 3, 2, 4)
    zeros = fea.new_zeros((n, c, s, s))
    summed = feature_swap([fea, zeros], canvas.view(n, py * (ky + 2), px * (kx + 2)), patch_size=3, stride=1,
                          padding=1, scale=s, out_size=(py * (ky + 2) * s, px * (kx + 2) * s), reduce="sum",
                          backend=backend)
    summed = summed.view(n, c, py, (ky + 2) * s, px, (kx + 2) * s)[:, :, :, :ky * s, :, :kx * s]
    count_y = coverage_count(ky, 3 * s, s, s, ky * s, fea.device, fea.dtype)
    count_x = coverage_count(kx, 3 * s, s, s, kx * s, fea.device, fea.dtype)
    resized = F.interpolate(att, size=(ky * s, kx * s), mode="bilinear", align_corners=False).to(fea.dtype)
    scale = resized.view(n, py, px, 1, ky * s, kx * s).permute(0, 3, 1, 4, 2, 5)
    out = summed / (count_y.view(-1, 1) * count_x).view(1, 1, 1, ky * s, 1, kx * s) * scale
    return out.reshape(n, c, py * ky * s, px * kx * s)


def _exact(fea_lr: Tensor, fea_reflr: Tensor, levels: list[Tensor], backend: str,
           precision: str) -> list[Tensor]:
    hr, wr = fea_reflr.shape[-2:]
    query = F.pad(fea_lr, (1, 1, 1, 1), mode="replicate")
    match = patch_match(query, fea_reflr, patch_size=3, stride=1, padding=0, backend=backend,
                        precision=precision)
    soft_att = match.score.unsqueeze(1)
    return [_swap(fea[..., :hr * s, :wr * s], match.index, soft_att, 3, 1, s, backend)
            for fea, s in zip(levels, LEVEL_SCALES, strict=True)]


class MASAWarp(nn.Module):
    """:func:`masa_warp` as a module: ``forward(fea_lr, fea_reflr, fea_ref_l) -> warp_ref_l``.

    In MASA's ``forward``, everything from the block cutting to ``warp_ref_l = [...]`` becomes
    ``warp_ref_l = self.warp(fea_lr_l[0], fea_reflr_l[0], fea_ref_l)`` with
    ``self.warp = MASAWarp()`` (no parameters: MASA checkpoints load unchanged).
    """

    def __init__(self, lr_block_size: int = 8, ref_down_block_size: float = 1.5,
                 dilations: Sequence[int] = (1, 2, 3), exact: bool = False, backend: str = "auto",
                 precision: str = "highest"):
        super().__init__()
        self.lr_block_size, self.ref_down_block_size = lr_block_size, ref_down_block_size
        self.dilations, self.exact = tuple(dilations), exact
        self.backend, self.precision = backend, precision

    def forward(self, fea_lr: Tensor, fea_reflr: Tensor, fea_ref_l: Sequence[Tensor]) -> list[Tensor]:
        return masa_warp(fea_lr, fea_reflr, fea_ref_l, lr_block_size=self.lr_block_size,
                         ref_down_block_size=self.ref_down_block_size, dilations=self.dilations,
                         exact=self.exact, backend=self.backend, precision=self.precision)


class MASAMethods:
    """MASA's ``search_org``, ``search`` and ``transfer`` as methods (they read ``self.num_nbr``).

    ``class MASA(MASAMethods, MASA_arch.MASA)`` keeps MASA's ``forward`` and replaces the three;
    the transfer then does not unfold the windows. :class:`MASAWarp` replaces the whole stage.
    """

    def search_org(self, lr, reflr, ks=3, pd=1, stride=1):
        return search_org(lr, reflr, ks, pd, stride, self.num_nbr)

    def search(self, lr, reflr, ks=3, pd=1, stride=1, dilations=(1, 2, 4)):
        return search(lr, reflr, ks, pd, stride, dilations, self.num_nbr)

    def transfer(self, fea, index, soft_att, ks=3, pd=1, stride=1):
        return transfer(fea, index, soft_att, ks, pd, stride)
