"""srntt_core.compat.c2matching against a plain-torch rendering of C2-Matching's / DATSR's matching."""

from __future__ import annotations

import functools

import peak_memory
import pytest
import torch
import torch.nn.functional as F
from conftest import load_image

from srntt_core.compat.c2matching import (
    Correspondence,
    CorrespondenceMatcher,
    correspondence_match,
    feature_match_index,
    index_to_flow,
    similarity_maps,
)

# NB: their ranking divides by |k| + 1e-5, a cosine search by |k|; after per-pixel normalization the
# two differ by at most ~1e-5 relative (only for patches with all-zero pixels), so indices are
# compared where their best score beats the runner-up by more than 1e-4.
MARGIN = 1e-4


# ---------------------------------------------------------------------------------------------
# C2-Matching, as published: reference patches (valid grid) divided by their norm + 1e-5, correlated
# with the input, max over the reference axis; with norm_input the max is divided by the input
# patch's norm + 1e-5. The correspondence step first L2-normalizes each pixel's channel vector.

def match_original(feat_input, feat_ref, patch_size=3, stride=1, norm_input=False, index=None,
                   ref_stride=None):
    """(C, H, W) maps -> ``(max_idx, max_val, margin)`` on the input's valid grid; ``index``
    overrides the argmax (``max_val`` is then the score of that pair)."""
    gh = (feat_input.shape[1] - patch_size) // stride + 1
    gw = (feat_input.shape[2] - patch_size) // stride + 1
    ref_stride = stride if ref_stride is None else ref_stride
    ref = F.unfold(feat_ref[None], patch_size, stride=ref_stride)[0]  # (C k k, N_ref)
    ref = ref / (ref.norm(dim=0, keepdim=True) + 1e-5)
    inp = F.unfold(feat_input[None], patch_size, stride=stride)[0]  # (C k k, N_in)
    corr = ref.t() @ inp  # the N_ref x N_in correlation
    top = corr.topk(min(2, corr.shape[0]), dim=0).values
    max_val, max_idx = corr.max(dim=0)
    if index is not None:
        max_idx = index.reshape(-1)
        max_val = corr.gather(0, max_idx[None])[0]
    margin = top[0] - top[1] if top.shape[0] > 1 else torch.full_like(max_val, float("inf"))
    if norm_input:
        max_val = max_val / (inp.norm(dim=0) + 1e-5)
    return max_idx.view(gh, gw), max_val.view(gh, gw), margin.view(gh, gw)


def correspondence_original(feat_in, feat_ref, patch_size=3, stride=1, index=None):
    """Their per-sample loop: per-pixel normalization, then matching with norm_input=True."""
    out = []
    for i, (a, b) in enumerate(zip(feat_in, feat_ref, strict=True)):
        c = a.shape[0]
        a = F.normalize(a.reshape(c, -1), dim=0).view_as(a)
        b = F.normalize(b.reshape(c, -1), dim=0).view_as(b)
        out.append(match_original(a, b, patch_size, stride, norm_input=True,
                                  index=None if index is None else index[i]))
    return [torch.stack(t) for t in zip(*out, strict=True)]


def check(ours, original, atol=1e-5):
    """``original(index=None)`` -> (index, value, margin). Indices where clear, values everywhere
    (where the runner-up is within MARGIN, the original's value for our choice)."""
    index, value, margin = original()
    clear = margin > MARGIN
    assert clear.float().mean() > 0.9
    assert torch.equal(ours.index[clear], index[clear])
    if not bool(clear.all()):
        _, value, _ = original(index=torch.where(clear, index, ours.index))
    torch.testing.assert_close(ours.value, value, atol=atol, rtol=1e-5)


def test_random_features_match_c2matching():
    g = torch.Generator().manual_seed(0)
    feat_in, feat_ref = torch.randn(2, 16, 13, 11, generator=g), torch.randn(2, 16, 12, 14, generator=g)
    ours = correspondence_match(feat_in, feat_ref)
    check(ours, functools.partial(correspondence_original, feat_in, feat_ref))
    module = CorrespondenceMatcher()(feat_in, feat_ref)
    assert torch.equal(module.index, ours.index)


def test_features_with_zero_pixels_match_c2matching():
    # ReLU features can have all-zero pixels; their patches have norms below 3 and the +1e-5 matters.
    g = torch.Generator().manual_seed(1)
    feat_in = torch.randn(1, 8, 12, 12, generator=g).relu()
    feat_ref = torch.randn(1, 8, 12, 12, generator=g).relu()
    feat_in[..., 2:5, 3:7] = 0
    feat_ref[..., ::3, ::4] = 0
    ours = correspondence_match(feat_in, feat_ref)
    check(ours, functools.partial(correspondence_original, feat_in, feat_ref))


@pytest.mark.parametrize("norm_input", [False, True])
@pytest.mark.parametrize("patch_size,input_stride,ref_stride", [(3, 1, 1), (5, 2, 2), (3, 1, 2), (3, 3, 2)])
def test_feature_match_index_signature(norm_input, patch_size, input_stride, ref_stride):
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(8, 15, 13, generator=g), torch.rand(8, 14, 16, generator=g)
    ours = Correspondence(*feature_match_index(a, b, patch_size, input_stride, ref_stride, True, norm_input))
    check(ours, functools.partial(match_original, a, b, patch_size, input_stride, norm_input,
                                  ref_stride=ref_stride))


def test_real_image_features_match_c2matching():
    from srntt_core.models.vgg import VGG19Features

    vgg = VGG19Features(("relu3_1",))
    with torch.no_grad():
        feat_in = vgg(load_image("baboon_tl.png", (0, 0, 96, 96)))["relu3_1"]
        feat_ref = vgg(load_image("baboon_tl.png", (40, 32, 136, 128)))["relu3_1"]
    ours = correspondence_match(feat_in, feat_ref)
    check(ours, functools.partial(correspondence_original, feat_in, feat_ref))


def test_value_gradients_match_c2matching():
    g = torch.Generator().manual_seed(3)
    feat_in = torch.randn(1, 8, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    feat_ref = torch.randn(1, 8, 8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    index, value, margin = correspondence_original(feat_in, feat_ref)
    assert bool((margin > MARGIN).all())
    ours = correspondence_match(feat_in, feat_ref)
    assert torch.equal(ours.index, index)
    weight = torch.randn(value.shape, generator=g, dtype=torch.float64)
    theirs = torch.autograd.grad((value * weight).sum(), (feat_in, feat_ref))
    mine = torch.autograd.grad((ours.value * weight).sum(), (feat_in, feat_ref))
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_strided_value_gradients_match_c2matching():
    # input_stride != ref_stride goes through one match per input phase; gradients must still flow.
    g = torch.Generator().manual_seed(6)
    a = torch.randn(4, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 8, 9, generator=g, dtype=torch.float64, requires_grad=True)
    index, value, margin = match_original(a, b, 3, 1, True, ref_stride=2)
    assert bool((margin > MARGIN).all())
    idx, val = feature_match_index(a, b, 3, 1, 2, True, True)
    assert torch.equal(idx, index)
    weight = torch.randn(value.shape, generator=g, dtype=torch.float64)
    theirs = torch.autograd.grad((value * weight).sum(), (a, b))
    mine = torch.autograd.grad((val * weight).sum(), (a, b))
    for x, y in zip(mine, theirs, strict=True):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-8)


def test_index_to_flow_and_similarity_maps_match_their_layout():
    g = torch.Generator().manual_seed(4)
    index = torch.randint(0, 6 * 6, (2, 6, 6), generator=g)
    flow = index_to_flow(index)
    assert flow.shape == (2, 8, 8, 2)
    for b in range(2):  # theirs, per sample: (x, y) offsets, padded by 2 at the bottom and right
        for i in range(6):
            for j in range(6):
                k = int(index[b, i, j])
                assert flow[b, i, j].tolist() == [k % 6 - j, k // 6 - i]
    assert not flow[:, 6:].any() and not flow[:, :, 6:].any()
    value = torch.rand(2, 6, 6, generator=g)
    sims = similarity_maps(value)
    padded = F.pad(value, (1, 1, 1, 1))
    assert torch.equal(sims["relu3_1"][:, 0], padded)
    assert torch.equal(sims["relu2_1"][:, 0, 5, 3], padded[:, 2, 1])
    assert torch.equal(sims["relu1_1"][:, 0, 13, 6], padded[:, 3, 1])
    assert sims["relu1_1"].shape == (2, 1, 32, 32)


def test_unsupported_modes_are_errors():
    a = torch.rand(4, 8, 8)
    with pytest.raises(ValueError, match="is_norm"):
        feature_match_index(a, a, is_norm=False)
    with pytest.raises(ValueError, match="ref_stride"):
        feature_match_index(a, a, input_stride=1, ref_stride=0)
    with pytest.raises(ValueError, match="feat_input"):
        feature_match_index(a[None], a)


# ---------------------------------------------------------------------------------------------
# memory: the original's conv output holds N_ref x N_in scores (its batches cap that at 2 GiB).

@pytest.mark.skipif(not peak_memory.supported(), reason="needs Linux, glibc and /proc/self/clear_refs")
@pytest.mark.skipif(not peak_memory.kernels_available(), reason=peak_memory.KERNELS_REASON)
def test_memory_is_far_below_the_correlation():
    g = torch.Generator().manual_seed(5)
    feat_in, feat_ref = torch.randn(1, 16, 66, 66, generator=g), torch.randn(1, 16, 66, 66, generator=g)
    with torch.no_grad():
        ours = peak_memory.peak_bytes(lambda: correspondence_match(feat_in, feat_ref))
        original = peak_memory.peak_bytes(lambda: correspondence_original(feat_in, feat_ref))
    nxn = (64 * 64) ** 2 * 4
    assert original >= nxn
    assert ours < nxn / 8


def test_half_precision_returns_the_input_dtype():
    # Their conv2d correlation is in the inputs' dtype; ours is computed in float32, then cast.
    g = torch.Generator().manual_seed(7)
    a, b = torch.rand(1, 8, 10, 10, generator=g).half(), torch.rand(1, 8, 9, 11, generator=g).half()
    ours = correspondence_match(a, b)
    assert ours.value.dtype == torch.float16
    full = correspondence_match(a.float(), b.float())
    assert torch.equal(ours.index, full.index) and torch.equal(ours.value, full.value.half())
    assert feature_match_index(a[0], b[0])[1].dtype == torch.float16


def tensor_shift_original(x, shift):
    """Their tensor_shift: (B, H, W, 2) moved down / right by ``shift``, zero-filled."""
    new = torch.zeros_like(x)
    h, w = x.shape[1] - shift[0], x.shape[2] - shift[1]
    new[:, shift[0]:, shift[1]:] = x[:, :h, :w]
    return new


def test_offset_and_flow_maps_match_their_correspondence_generation():
    from srntt_core.compat.c2matching import flow_maps, offset_maps

    g = torch.Generator().manual_seed(8)
    index = torch.randint(0, 7 * 6, (2, 7, 6), generator=g)
    flows, offsets = flow_maps(index), offset_maps(index)
    # Their per-sample loop: index_to_flow, then repeat_interleave x s and * s, then 9 shifts.
    for b in range(2):
        relu3 = index_to_flow(index[b:b + 1])
        for layer, s in (("relu3_1", 1), ("relu2_1", 2), ("relu1_1", 4)):
            flow = relu3.repeat_interleave(s, 1).repeat_interleave(s, 2) * s
            assert torch.equal(flows[layer][b:b + 1], flow)
            shifted = torch.cat([tensor_shift_original(flow, (i * s, j * s))
                                 for i in range(3) for j in range(3)])
            assert torch.equal(offsets[layer][b], shifted)
    assert offsets["relu1_1"].shape == (2, 9, 36, 32, 2)
