"""srntt_core.compat.srntt against a plain-torch rendering of SRNTT's published multi-layer swap."""

from __future__ import annotations

import numpy as np
import peak_memory
import pytest
import torch
import torch.nn.functional as F
from conftest import load_image

from srntt_core.compat.srntt import Swap, Swapper, srntt_swap, srntt_weight_maps, tf_resize_bicubic

MARGIN = 1e-5


# ---------------------------------------------------------------------------------------------
# SRNTT, as published (one sample, (C, H, W) maps): condition patches on the valid grid divided by
# their norm, correlated with the raw content, argmax over the concatenated references; swapped maps
# pasted patch by patch (3r x 3r windows at stride r for a layer r times larger) and divided by the
# count of patches covering each pixel; weights = the max over all pairs of the cosine.
# ``norm_eps`` = 1e-5 gives srntt-pytorch's weights (both patches divided by norm + 1e-5).

def swap_original(content, styles, conditions, other_styles=(), patch_size=3, norm_eps=None, index=None):
    """Returns ``(maps, weights, max_idx, margin)``; ``index`` overrides the argmax."""
    add = 0.0 if norm_eps is None else norm_eps
    cond = torch.cat([F.unfold(c[None], patch_size)[0] for c in conditions], dim=1)  # (D, N_ref)
    cond_n = cond / (cond.norm(dim=0, keepdim=True) + add)
    query = F.unfold(content[None], patch_size)[0]  # (D, N_in)
    corr = cond_n.t() @ query  # the N_ref x N_in correlation
    top = corr.topk(2, dim=0).values
    margin = top[0] - top[1]
    max_idx = corr.argmax(dim=0) if index is None else index.flatten()
    query_n = query / (query.norm(dim=0, keepdim=True) + add)
    weights = (query_n.t() @ cond_n).max(dim=1).values  # the N_in x N_ref correlation again
    gh, gw = content.shape[1] - patch_size + 1, content.shape[2] - patch_size + 1
    maps = []
    for level in [styles, *other_styles]:
        r = level[0].shape[1] // styles[0].shape[1]
        win = patch_size * r
        patches = torch.cat([F.unfold(s[None], win, stride=r)[0] for s in level], dim=1)
        target = content.new_zeros(level[0].shape[0], content.shape[1] * r, content.shape[2] * r)
        count = content.new_zeros(target.shape[1:])
        for i in range(gh):
            for j in range(gw):
                patch = patches[:, max_idx[i * gw + j]].view(-1, win, win)
                target[:, i * r:i * r + win, j * r:j * r + win] += patch
                count[i * r:i * r + win, j * r:j * r + win] += 1
        maps.append(target / count)
    return maps, weights.view(gh, gw), max_idx.view(gh, gw), margin.view(gh, gw)


def check(result, content, styles, conditions, other_styles=(), norm_eps=None, atol=1e-5):
    """Compares a batched SRNTTSwap with the per-sample rendering."""
    for b in range(content.shape[0]):
        args = (content[b], [s[b] for s in styles], [c[b] for c in conditions],
                [[s[b] for s in level] for level in other_styles])
        maps, weights, max_idx, margin = swap_original(*args, norm_eps=norm_eps)
        clear = margin > MARGIN
        assert clear.float().mean() > 0.9
        assert torch.equal(result.index[b][clear], max_idx[clear])
        if not bool(clear.all()):  # where the runner-up is within MARGIN, values use our choice
            index = torch.where(clear, max_idx, result.index[b])
            maps, weights, _, _ = swap_original(*args, norm_eps=norm_eps, index=index)
        for ours, theirs in zip(result.maps, maps, strict=True):
            torch.testing.assert_close(ours[b], theirs, atol=atol, rtol=1e-5)
        if result.weights is not None:
            torch.testing.assert_close(result.weights[b], weights, atol=atol, rtol=0)


def random_levels(b=2, c=8, h=11, w=13, ref_sizes=((9, 10), (7, 12)), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    content = r(b, c, h, w)
    styles = [r(b, c, hh, ww) for hh, ww in ref_sizes]
    conditions = [r(b, c, hh, ww) for hh, ww in ref_sizes]
    others = [[r(b, c // 2, 2 * hh, 2 * ww) for hh, ww in ref_sizes],
              [r(b, c // 4, 4 * hh, 4 * ww) for hh, ww in ref_sizes]]
    return content, styles, conditions, others


def test_random_multi_reference_multi_layer_matches_srntt():
    content, styles, conditions, others = random_levels()
    result = srntt_swap(content, styles, conditions, others, is_weight=True)
    assert [m.shape[-2:] for m in result.maps] == [(11, 13), (22, 26), (44, 52)]
    check(result, content, styles, conditions, others)


def test_swap_class_is_srntt_numpy_interface():
    content, styles, conditions, others = random_levels(b=1, ref_sizes=((10, 9),), seed=1)
    hwc = lambda t: t[0].permute(1, 2, 0).numpy()  # noqa: E731
    maps, weights, max_idx = Swap().conditional_swap_multi_layer(
        hwc(content)[None], [hwc(s) for s in styles], [hwc(c) for c in conditions],
        other_styles=[[hwc(s) for s in level] for level in others], is_weight=True)
    ref_maps, ref_weights, ref_idx, margin = swap_original(
        content[0], [styles[0][0]], [conditions[0][0]], [[level[0][0]] for level in others])
    assert bool((margin > MARGIN).all())
    np.testing.assert_array_equal(max_idx, ref_idx.numpy())
    np.testing.assert_allclose(weights, ref_weights.numpy(), atol=1e-5)
    for ours, theirs in zip(maps, ref_maps, strict=True):
        assert ours.shape == theirs.permute(1, 2, 0).shape
        np.testing.assert_allclose(ours, theirs.permute(1, 2, 0).numpy(), atol=1e-5, rtol=1e-5)
    _, no_weights, _ = Swap().conditional_swap_multi_layer(hwc(content), [hwc(styles[0])],
                                                            [hwc(conditions[0])])
    assert no_weights is None


def _down_up(x):
    down = F.interpolate(x, scale_factor=0.25, mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(down, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)


def test_swapper_on_real_images_matches_srntt_pytorch():
    from srntt_core.models.vgg import VGG19Features

    vgg = VGG19Features(("relu1_1", "relu2_1", "relu3_1"))
    hr = load_image("baboon_tl.png", (0, 0, 96, 96))
    ref = load_image("baboon_tl.png", (40, 32, 136, 112))
    with torch.no_grad():
        map_in, map_ref, map_blur = vgg(_down_up(hr)), vgg(ref), vgg(_down_up(ref))
    maps, weights, max_idx = Swapper()(map_in, map_ref, map_blur, is_weight=True)
    assert set(maps) == {"relu3_1", "relu2_1", "relu1_1"}
    assert maps["relu1_1"].shape == (64, 96, 96) and weights.shape == max_idx.shape == (22, 22)
    result = srntt_swap(map_in["relu3_1"], map_ref["relu3_1"], map_blur["relu3_1"],
                        [map_ref["relu2_1"], map_ref["relu1_1"]], is_weight=True, norm_eps=1e-5)
    np.testing.assert_array_equal(result.index[0].numpy(), max_idx)
    check(result, map_in["relu3_1"], [map_ref["relu3_1"]], [map_blur["relu3_1"]],
          [[map_ref["relu2_1"]], [map_ref["relu1_1"]]], norm_eps=1e-5)


def test_gradients_match_srntt_rendering():
    content, styles, conditions, others = random_levels(b=1, c=4, h=6, w=7, ref_sizes=((5, 6),), seed=2,
                                                        dtype=torch.float64)
    leaves = [content, styles[0], conditions[0], others[0][0]]
    for t in leaves:
        t.requires_grad_()
    result = srntt_swap(content, styles, conditions, [others[0]], is_weight=True)
    maps, weights, max_idx, margin = swap_original(content[0], [styles[0][0]], [conditions[0][0]],
                                                   [[others[0][0][0]]])
    assert bool((margin > MARGIN).all()) and torch.equal(result.index[0], max_idx)
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (*maps, weights)]
    ours = torch.autograd.grad(sum((o[0] * w).sum() for o, w in zip((*result.maps, result.weights), ws,
                                                                     strict=True)), leaves)
    theirs = torch.autograd.grad(sum((o * w).sum() for o, w in zip((*maps, weights), ws, strict=True)),
                                 leaves)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def _tf_bicubic_loops(x, out_h, out_w):
    """TensorFlow 1 resize_bicubic written out per output pixel over its 4 x 4 source taps."""
    def kernel(d, a=-0.75):
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a if d < 2 else 0.0

    h, w = x.shape
    out = np.zeros((out_h, out_w))
    for y in range(out_h):
        for xo in range(out_w):
            sy, sx = y * h / out_h, xo * w / out_w
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            for m in range(-1, 3):
                for n in range(-1, 3):
                    yy, xx = min(max(y0 + m, 0), h - 1), min(max(x0 + n, 0), w - 1)
                    out[y, xo] += x[yy, xx] * kernel(sy - (y0 + m)) * kernel(sx - (x0 + n))
    return out


def test_weight_maps_as_srntt_makes_them():
    g = torch.Generator().manual_seed(4)
    weights = torch.rand(2, 5, 6, generator=g, dtype=torch.float64)
    level1, level2, level4 = srntt_weight_maps(weights)
    padded = np.pad(weights[1].numpy(), ((1, 1), (1, 1)), "edge")
    np.testing.assert_allclose(level1[1, 0].numpy(), padded)
    np.testing.assert_allclose(level2[1, 0].numpy(), _tf_bicubic_loops(padded, 14, 16), atol=1e-12)
    np.testing.assert_allclose(level4[1, 0].numpy(), _tf_bicubic_loops(padded, 28, 32), atol=1e-12)
    torch.testing.assert_close(tf_resize_bicubic(level1, (14, 16)), level2)
    ported = srntt_weight_maps(weights, convention="srntt-pytorch")
    base = F.pad(weights.unsqueeze(1), (1, 1, 1, 1), mode="replicate")
    expected = F.interpolate(base, scale_factor=4, mode="bicubic", align_corners=True)
    torch.testing.assert_close(ported[2], expected)


def test_bad_arguments_are_errors():
    content, styles, conditions, _ = random_levels()
    with pytest.raises(ValueError, match="stride"):
        srntt_swap(content, styles, conditions, stride=2)
    with pytest.raises(ValueError, match="condition\\[1\\]"):
        srntt_swap(content, styles, [conditions[0], conditions[0]])
    with pytest.raises(ValueError, match="other_styles\\[0\\]"):
        srntt_swap(content, styles, conditions, [[s[..., :-1, :] for s in styles]])
    with pytest.raises(ValueError, match="convention"):
        srntt_weight_maps(torch.rand(1, 3, 3), convention="tf2")


# ---------------------------------------------------------------------------------------------
# memory: the original forms the N_ref x N_in correlation twice (argmax, then weights).

@pytest.mark.skipif(not peak_memory.supported(), reason="needs Linux, glibc and /proc/self/clear_refs")
@pytest.mark.skipif(not peak_memory.kernels_available(), reason=peak_memory.KERNELS_REASON)
def test_memory_is_far_below_the_correlation():
    content, styles, conditions, _ = random_levels(b=1, c=8, h=66, w=66, ref_sizes=((66, 66),), seed=5)
    with torch.no_grad():
        ours = peak_memory.peak_bytes(lambda: srntt_swap(content, styles, conditions, is_weight=True))
        original = peak_memory.peak_bytes(
            lambda: _matching_original(content[0], styles[0][0], conditions[0][0]))
    nxn = (64 * 64) ** 2 * 4
    assert original >= nxn
    assert ours < nxn / 8


def _matching_original(content, style, condition):
    # The rendering without its Python paste loop (slow at this size; it holds O(N) memory anyway).
    cond = F.unfold(condition[None], 3)[0]
    cond_n = cond / cond.norm(dim=0, keepdim=True)
    query = F.unfold(content[None], 3)[0]
    max_idx = (cond_n.t() @ query).argmax(dim=0)
    weights = ((query / query.norm(dim=0, keepdim=True)).t() @ cond_n).max(dim=1).values
    return max_idx, weights


def test_swapper_accepts_reference_sides_of_2_mod_4():
    # A 42-pixel reference: relu3_1 10, relu2_1 21, relu1_1 42. srntt-pytorch's windows (6 at stride 2,
    # 12 at stride 4) then form the same 8x8 grid as relu3_1's patches; the extra rows are never read.
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    map_in = {"relu3_1": r(1, 8, 10, 10), "relu2_1": r(1, 4, 20, 20), "relu1_1": r(1, 2, 40, 40)}
    map_ref = {"relu3_1": r(1, 8, 10, 10), "relu2_1": r(1, 4, 21, 21), "relu1_1": r(1, 2, 42, 42)}
    map_blur = {"relu3_1": r(1, 8, 10, 10)}
    maps, weights, max_idx = Swapper()(map_in, map_ref, map_blur)
    theirs, their_weights, their_idx, margin = swap_original(
        map_in["relu3_1"][0], [map_ref["relu3_1"][0]], [map_blur["relu3_1"][0]],
        [[map_ref["relu2_1"][0]], [map_ref["relu1_1"][0]]], norm_eps=1e-5)
    assert bool((margin > MARGIN).all())
    np.testing.assert_array_equal(max_idx, their_idx.numpy())
    for layer, t in zip(("relu3_1", "relu2_1", "relu1_1"), theirs, strict=True):
        np.testing.assert_allclose(maps[layer], t.numpy(), atol=1e-5, rtol=1e-5)
    # Without the per-layer ratios the scale is ambiguous; the error says what srntt-pytorch does.
    with pytest.raises(ValueError, match=r"ratios=\(2, 4\)"):
        srntt_swap(map_in["relu3_1"], map_ref["relu3_1"], map_blur["relu3_1"], [map_ref["relu2_1"]])
    with pytest.raises(ValueError, match="would not line up"):
        srntt_swap(map_in["relu3_1"], map_ref["relu3_1"], map_blur["relu3_1"], [map_ref["relu2_1"][..., :19]],
                   ratios=[2])


def test_half_precision_weights_are_in_the_input_dtype():
    # srntt-pytorch's weights come out of its matmul in the inputs' dtype.
    content, styles, conditions, _ = random_levels(b=1, seed=4)
    half = srntt_swap(content.half(), [s.half() for s in styles], [c.half() for c in conditions],
                      is_weight=True, norm_eps=1e-5)
    assert half.weights.dtype == torch.float16 and half.maps[0].dtype == torch.float16
    full = srntt_swap(content.half().float(), [s.half().float() for s in styles],
                      [c.half().float() for c in conditions], is_weight=True, norm_eps=1e-5)
    assert torch.equal(half.weights, full.weights.half())
