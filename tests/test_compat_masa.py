"""srntt_core.compat.masa against a plain-torch rendering of MASA-SR's search and transfer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from srntt_core.cli import SAMPLE_IMAGE
from srntt_core.compat import _memory
from srntt_core.compat.masa import MASAMethods, MASAWarp, masa_warp, search, search_org, transfer

ASSET = SAMPLE_IMAGE
MARGIN = 1e-5


# ---------------------------------------------------------------------------------------------
# MASA-SR, as published (models/archs/MASA_arch.py), written out with unfold / bmm / fold.

def top2(corr):
    """Best value, its index and the margin to the runner-up over the last axis."""
    top = corr.topk(2, dim=-1)
    return top.values[..., 0], top.indices[..., 0], top.values[..., 0] - top.values[..., 1]


def search_org_original(lr, reflr, pick=None):
    """``(score, index, margin)`` (N, H - 2, W - 2): cosine of 3x3 valid patches, bmm, top-1.
    ``pick`` overrides the index (the score is then that pair's)."""
    n, _, h, w = lr.shape
    q = F.normalize(F.unfold(lr, 3), dim=1).transpose(1, 2)
    k = F.normalize(F.unfold(reflr, 3), dim=1)
    corr = torch.bmm(q, k)
    score, index, margin = top2(corr)
    if pick is not None:
        index = pick.reshape(n, -1)
        score = corr.gather(2, index[..., None])[..., 0]
    shape = (n, h - 2, w - 2)
    return score.view(shape), index.view(shape), margin.view(shape)


def search_original(blocks, reflr, dilations, pick=None):
    """``(score, index, margin)`` (N, P): summed cosines of the dilated centre patch of each block."""
    n, p, c, ky, kx = blocks.shape
    y, x = ky // 2, kx // 2
    total = 0
    for d in dilations:
        k = F.normalize(F.unfold(reflr, 3, dilation=d, padding=d), dim=1)
        q = F.normalize(blocks[:, :, :, y - d:y + d + 1:d, x - d:x + d + 1:d].reshape(n, p, -1), dim=2)
        total = total + torch.bmm(q, k)
    score, index, margin = top2(total)
    if pick is not None:
        index = pick.reshape(n, p)
        score = total.gather(2, index[..., None])[..., 0]
    return score, index, margin


def transfer_original(fea, index, soft_att, ks, pd, s):
    cols = F.unfold(fea, ks, stride=s)
    picked = cols.gather(2, index.flatten(1)[:, None].expand(-1, cols.shape[1], -1))
    hi, wi = index.shape[-2:]
    out = F.fold(picked, (hi * s, wi * s), ks, padding=pd, stride=s)
    count = F.fold(torch.ones_like(picked), (hi * s, wi * s), ks, padding=pd, stride=s)
    att = F.interpolate(soft_att, size=(hi * s, wi * s), mode="bilinear", align_corners=False)
    return out / count * att


def window(pos, diameter, size):
    """MASA's window bounds around ``pos``: pushed right at 0, then left at the far border."""
    lo, hi = pos - diameter // 2 - 1, pos + diameter // 2 + 1
    if lo < 0:
        lo, hi = 0, diameter + 1
    if hi > size - 1:
        lo, hi = size - 1 - (diameter + 1), size - 1
    return lo


def warp_original(fea_lr, fea_reflr, fea_ref, block=8, ratio=1.5, dilations=(1, 2, 3), centre=None,
                  local=None):
    """MASA's forward from the encoder features to warp_ref_l ([x4, x2, x1]) and the margins of
    its global and local searches; ``centre`` / ``local`` override its choices."""
    n, c, h, w = fea_lr.shape
    hr, wr = fea_reflr.shape[-2:]
    px, py = w // block, h // block
    kx, ky = w // px, h // py
    dx = 2 * int(wr // (2 * px) * ratio) + 1
    dy = 2 * int(hr // (2 * py) * ratio) + 1
    padded = F.pad(fea_lr, (1, 1, 1, 1), mode="replicate")
    blocks = F.unfold(padded, (ky + 2, kx + 2), stride=(ky, kx))
    blocks = blocks.view(n, c, ky + 2, kx + 2, py * px).permute(0, 4, 1, 2, 3)
    score_g, arg, margin_g = search_original(blocks, fea_reflr, dilations, pick=centre)
    y0 = torch.tensor([window(int(a) // wr, dy, hr) for a in arg.flatten()])
    x0 = torch.tensor([window(int(a) % wr, dx, wr) for a in arg.flatten()])
    batch = torch.arange(n).repeat_interleave(py * px)

    def crops(fea, s):  # one gather for all blocks; negative starts wrap around, as in MASA's gather
        rows = y0[:, None] * s + torch.arange((dy + 2) * s)
        cols = x0[:, None] * s + torch.arange((dx + 2) * s)
        crop = fea[batch[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return crop.permute(0, 3, 1, 2).contiguous()

    flat_blocks = blocks.reshape(n * py * px, c, ky + 2, kx + 2)
    score, index, margin_l = search_org_original(flat_blocks, crops(fea_reflr, 1), pick=local)
    maps = []
    for fea, s in zip(fea_ref, (4, 2, 1), strict=True):
        t = transfer_original(crops(fea, s), index, score[:, None], 3 * s, s, s)
        cl = t.shape[1]
        t = t.view(n, py, px, cl, ky * s, kx * s).permute(0, 3, 1, 4, 2, 5).reshape(n, cl, h * s, w * s)
        maps.append(t)
    return maps, (arg, score_g, margin_g), (index, score, margin_l), flat_blocks


def check_warp(fea_lr, fea_reflr, fea_ref, block=8, ratio=1.5, dilations=(1, 2, 3), atol=1e-5, min_clear=0.9,
               backend="auto"):
    """Our warp against the rendering: indices where clear, maps everywhere (with our choices where
    the runner-up is within MARGIN: search / search_org on the same blocks and windows, which is
    what masa_warp runs)."""
    geometry = {"block": block, "ratio": ratio, "dilations": dilations}
    _, (arg, _, margin_g), _, blocks = warp_original(fea_lr, fea_reflr, fea_ref, **geometry)
    n, p = arg.shape
    _, ours_g = search(blocks.view(n, p, *blocks.shape[1:]), fea_reflr, dilations=dilations)
    clear_g = margin_g > MARGIN
    assert torch.equal(ours_g[..., 0][clear_g], arg[clear_g])
    centre = torch.where(clear_g, arg, ours_g[..., 0])
    maps, _, (index, _, margin_l), _ = warp_original(fea_lr, fea_reflr, fea_ref, centre=centre, **geometry)
    clear_l = margin_l > MARGIN
    assert clear_l.float().mean() >= min_clear
    if not bool(clear_l.all()):
        windows = windows_original(fea_lr, fea_reflr, centre, block, ratio)
        _, ours_l = search_org(blocks, windows, backend=backend)
        assert torch.equal(ours_l[..., 0][clear_l], index[clear_l])
        maps, *_ = warp_original(fea_lr, fea_reflr, fea_ref, centre=centre,
                                 local=torch.where(clear_l, index, ours_l[..., 0]), **geometry)
    ours = masa_warp(fea_lr, fea_reflr, fea_ref, lr_block_size=block, ref_down_block_size=ratio,
                     dilations=dilations, backend=backend)
    for a, b in zip(ours, maps, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)
    return ours


def windows_original(fea_lr, fea_reflr, centre, block=8, ratio=1.5):
    n, c, h, w = fea_lr.shape
    hr, wr = fea_reflr.shape[-2:]
    px, py = w // block, h // block
    dx = 2 * int(wr // (2 * px) * ratio) + 1
    dy = 2 * int(hr // (2 * py) * ratio) + 1
    out = []
    for i, a in enumerate(centre.flatten()):
        y0, x0 = window(int(a) // wr, dy, hr), window(int(a) % wr, dx, wr)
        out.append(fea_reflr[i // (py * px)][:, torch.arange(y0, y0 + dy + 2)[:, None],
                                             torch.arange(x0, x0 + dx + 2)[None, :]])
    return torch.stack(out)


def random_case(n=2, c=8, h=16, w=24, hr=20, wr=16, seed=0, dtype=torch.float32, channels=(5, 6, 7)):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    fea_ref = [r(n, ch, hr * s, wr * s) for ch, s in zip(channels, (4, 2, 1), strict=True)]
    return r(n, c, h, w), r(n, c, hr, wr), fea_ref


# ---------------------------------------------------------------------------------------------
# the building blocks

def test_search_org_matches_masa():
    g = torch.Generator().manual_seed(1)
    lr, reflr = torch.randn(3, 8, 10, 9, generator=g), torch.randn(3, 8, 12, 11, generator=g)
    corr, ind = search_org(lr, reflr)
    assert corr.shape == ind.shape == (3, 8, 7, 1)
    score, index, margin = search_org_original(lr, reflr)
    clear = margin > MARGIN
    assert torch.equal(ind[..., 0][clear], index[clear])
    score, _, _ = search_org_original(lr, reflr, pick=ind[..., 0])
    torch.testing.assert_close(corr[..., 0], score, atol=1e-6, rtol=1e-5)


def test_search_matches_masa():
    g = torch.Generator().manual_seed(2)
    blocks, reflr = torch.randn(2, 5, 8, 10, 12, generator=g), torch.randn(2, 8, 13, 11, generator=g)
    corr, ind = search(blocks, reflr, dilations=(1, 2, 4))
    assert corr.shape == ind.shape == (2, 5, 1)
    score, index, margin = search_original(blocks, reflr, (1, 2, 4))
    assert bool((margin > MARGIN).all())
    assert torch.equal(ind[..., 0], index)
    torch.testing.assert_close(corr[..., 0], score, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("s", [1, 2, 4])
def test_transfer_matches_masa(s):
    g = torch.Generator().manual_seed(3)
    fea = torch.randn(2, 6, 9 * s, 7 * s, generator=g)
    index = torch.randint(0, 7 * 5, (2, 8, 6), generator=g)
    soft_att = torch.rand(2, 1, 8, 6, generator=g)
    ours = transfer(fea, index, soft_att, 3 * s, s, s)
    theirs = transfer_original(fea, index, soft_att, 3 * s, s, s)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_methods_mixin_reads_num_nbr():
    class Model(MASAMethods):
        num_nbr = 1

    g = torch.Generator().manual_seed(4)
    lr, reflr = torch.randn(1, 4, 6, 6, generator=g), torch.randn(1, 4, 7, 7, generator=g)
    assert torch.equal(Model().search_org(lr, reflr)[1], search_org(lr, reflr)[1])
    Model.num_nbr = 2
    with pytest.raises(ValueError, match="num_nbr"):
        Model().search_org(lr, reflr)


# ---------------------------------------------------------------------------------------------
# the whole stage: blocks, windows, local search, transfer

def test_random_features_match_masa(backend):
    fea_lr, fea_reflr, fea_ref = random_case()
    ours = check_warp(fea_lr, fea_reflr, fea_ref, backend=backend.name)
    assert [t.shape for t in ours] == [(2, 5, 64, 96), (2, 6, 32, 48), (2, 7, 16, 24)]
    module = MASAWarp(backend=backend.name)(fea_lr, fea_reflr, fea_ref)
    for a, b in zip(module, ours, strict=True):
        assert torch.equal(a, b)


def test_windows_wider_than_the_reference_wrap_like_masa():
    # One 8x8 block and an 8x8 Ref↓: MASA's 15-wide window starts at -7 and its gather wraps around,
    # so the window repeats columns (exact ties, compared with our choice).
    fea_lr, fea_reflr, fea_ref = random_case(n=1, h=8, w=8, hr=8, wr=8, seed=5)
    check_warp(fea_lr, fea_reflr, fea_ref, min_clear=0.0)


def _image(box):
    from PIL import Image

    img = Image.open(ASSET).convert("RGB").crop(box)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


def _down_up(x):
    down = F.interpolate(x, scale_factor=0.25, mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(down, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)


@pytest.fixture(scope="module")
def real_features():
    """VGG19 features of two zebra crops: relu3_1 of LR↑ (32x32) and Ref↓↑ (40x32) stand in for
    MASA's level-1 encoder features, relu1_1 / 2_1 / 3_1 of the Ref for its x4 / x2 / x1 levels."""
    from srntt_core.models.vgg import VGG19Features

    vgg = VGG19Features(("relu1_1", "relu2_1", "relu3_1"))
    lr, ref = _image((200, 120, 328, 248)), _image((260, 150, 388, 310))
    with torch.no_grad():
        feats = vgg(ref)
        return (vgg(_down_up(lr))["relu3_1"], vgg(_down_up(ref))["relu3_1"],
                [feats["relu1_1"], feats["relu2_1"], feats["relu3_1"]])


def test_real_image_features_match_masa(real_features, backend):
    fea_lr, fea_reflr, fea_ref = real_features
    assert fea_lr.shape[-2:] == (32, 32) and fea_reflr.shape[-2:] == (40, 32)
    check_warp(fea_lr, fea_reflr, fea_ref, backend=backend.name)


def test_exact_mode_is_one_block_with_the_whole_reference(real_features, backend):
    fea_lr, fea_reflr, fea_ref = real_features
    ours = masa_warp(fea_lr, fea_reflr, fea_ref, exact=True, backend=backend.name)
    score, index, margin = search_org_original(F.pad(fea_lr, (1, 1, 1, 1), mode="replicate"), fea_reflr)
    clear = margin > MARGIN
    assert clear.float().mean() > 0.9
    _, ours_index = search_org(F.pad(fea_lr, (1, 1, 1, 1), mode="replicate"), fea_reflr, backend=backend.name)
    assert torch.equal(ours_index[..., 0][clear], index[clear])
    score, index, _ = search_org_original(F.pad(fea_lr, (1, 1, 1, 1), mode="replicate"), fea_reflr,
                                          pick=torch.where(clear, index, ours_index[..., 0]))
    for t, fea, s in zip(ours, fea_ref, (4, 2, 1), strict=True):
        theirs = transfer_original(fea, index, score[:, None], 3 * s, s, s)
        torch.testing.assert_close(t, theirs, atol=1e-5, rtol=1e-5)


def test_gradients_match_masa():
    fea_lr, fea_reflr, fea_ref = random_case(n=1, c=4, h=16, w=16, hr=12, wr=12, seed=6, dtype=torch.float64,
                                             channels=(2, 3, 3))
    leaves = [fea_lr, fea_reflr, *fea_ref]
    for t in leaves:
        t.requires_grad_()
    maps, (_, _, margin_g), (_, _, margin_l), _ = warp_original(fea_lr, fea_reflr, fea_ref)
    assert bool((margin_g > MARGIN).all()) and bool((margin_l > MARGIN).all())
    for exact in (False, True):
        ours = masa_warp(fea_lr, fea_reflr, fea_ref, exact=exact)
        if exact:
            padded = F.pad(fea_lr, (1, 1, 1, 1), mode="replicate")
            score, index, margin = search_org_original(padded, fea_reflr)
            assert bool((margin > MARGIN).all())
            maps = [transfer_original(f, index, score[:, None], 3 * s, s, s)
                    for f, s in zip(fea_ref, (4, 2, 1), strict=True)]
        g = torch.Generator().manual_seed(7)
        weights = [torch.randn(m.shape, generator=g, dtype=torch.float64) for m in maps]
        theirs = torch.autograd.grad(sum((m * wt).sum() for m, wt in zip(maps, weights, strict=True)), leaves)
        mine = torch.autograd.grad(sum((m * wt).sum() for m, wt in zip(ours, weights, strict=True)), leaves)
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_exact_mode_scores_at_least_the_approximation(real_features):
    # Every pixel's exact best cosine is >= MASA's windowed one (each window is part of the reference).
    fea_lr, fea_reflr, fea_ref = real_features
    exact, _ = search_org(F.pad(fea_lr, (1, 1, 1, 1), mode="replicate"), fea_reflr)
    _, _, (_, windowed, _), _ = warp_original(fea_lr, fea_reflr, fea_ref)
    windowed = windowed.view(1, 4, 4, 8, 8).permute(0, 1, 3, 2, 4).reshape(1, 32, 32)
    assert bool((exact[..., 0] >= windowed - 1e-6).all())
    assert float((exact[..., 0] - windowed).mean()) > 1e-3


def test_half_precision_returns_the_input_dtype():
    fea_lr, fea_reflr, fea_ref = random_case(n=1, h=16, w=16, hr=16, wr=16, seed=8)
    half = [t.half() for t in (fea_lr, fea_reflr, *fea_ref)]
    for exact in (False, True):
        out = masa_warp(half[0], half[1], half[2:], exact=exact)
        assert all(t.dtype == torch.float16 for t in out)
    corr, _ = search_org(half[0], half[1])
    assert corr.dtype == torch.float16


def test_bad_input_is_an_error():
    fea_lr, fea_reflr, fea_ref = random_case(n=1, h=16, w=16, hr=16, wr=16, seed=9)
    with pytest.raises(ValueError, match="fea_lr"):  # 17 rows: 2 blocks of 8 and a row MASA cannot place
        masa_warp(torch.randn(1, 8, 17, 16), fea_reflr, fea_ref)
    with pytest.raises(ValueError, match="fea_lr"):
        masa_warp(fea_lr[..., :7, :], fea_reflr, fea_ref)
    with pytest.raises(ValueError, match=r"fea_ref\[0\]"):
        masa_warp(fea_lr, fea_reflr, [fea_ref[0][..., :60, :], *fea_ref[1:]])
    with pytest.raises(ValueError, match="fea_ref"):
        masa_warp(fea_lr, fea_reflr, fea_ref[:2])
    with pytest.raises(ValueError, match="num_nbr"):
        search_org(fea_lr, fea_reflr, num_nbr=2)
    with pytest.raises(ValueError, match="dilations"):
        search(fea_lr[:, None, :, :8, :8], fea_reflr, dilations=(1, 5))
    with pytest.raises(ValueError, match="ks, pd, stride"):
        transfer(fea_reflr, torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(1, 1, 4, 4), 6, 1, 2)


def test_registered_like_the_other_compat_modules():
    from srntt_core.compat import registry

    assert registry.MODULES["SRNTTCoreMASAWarp"] is MASAWarp
    assert list(MASAWarp().parameters()) == []  # MASA checkpoints load unchanged


def test_search_and_transfer_gradients_match_masa():
    g = torch.Generator().manual_seed(10)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    blocks, reflr = r(1, 3, 4, 10, 10), r(1, 4, 9, 8)
    score, index, margin = search_original(blocks, reflr, (1, 2, 3))
    assert bool((margin > MARGIN).all())
    corr, ind = search(blocks, reflr, dilations=(1, 2, 3))
    assert torch.equal(ind[..., 0], index)
    theirs = torch.autograd.grad(score.sum(), (blocks, reflr))
    for a, b in zip(torch.autograd.grad(corr.sum(), (blocks, reflr)), theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    fea, soft_att = r(2, 3, 14, 12), r(2, 1, 6, 5)
    index = torch.randint(0, 5 * 4, (2, 6, 5), generator=g)
    theirs = transfer_original(fea, index, soft_att, 6, 2, 2)
    ours = transfer(fea, index, soft_att, 6, 2, 2)
    weight = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad((theirs * weight).sum(), (fea, soft_att))
    for a, b in zip(torch.autograd.grad((ours * weight).sum(), (fea, soft_att)), expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------------------------------------
# memory: MASA unfolds every block's x4 window (C x 144 values per window cell); the drop-in never does.

@pytest.mark.skipif(not _memory.supported(), reason="needs Linux, glibc and /proc/self/clear_refs")
@pytest.mark.skipif(not _memory.kernels_available(), reason=_memory.KERNELS_REASON)
def test_memory_is_far_below_the_unfolded_windows():
    fea_lr, fea_reflr, fea_ref = random_case(n=1, c=32, h=48, w=48, hr=48, wr=48, seed=11,
                                             channels=(32, 32, 32))
    with torch.no_grad():
        masa_warp(fea_lr[..., :8, :8], fea_reflr, fea_ref)  # first call: loads the custom ops
        ours = _memory.peak_bytes(lambda: masa_warp(fea_lr, fea_reflr, fea_ref))
        original = _memory.peak_bytes(lambda: warp_original(fea_lr, fea_reflr, fea_ref))
    unfolded = 36 * 32 * 144 * 13 * 13 * 4  # 36 blocks, 13 x 13 window cells (window of 15)
    assert original >= unfolded
    assert ours < unfolded / 3
