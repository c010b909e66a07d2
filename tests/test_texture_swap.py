"""The SRNTT swap stage (docs/CONTRACT.md §7): texture_swap, TextureSwapper and weight_maps, against a direct
computation of each step from the images."""

import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_match, exact_match, grid

import srntt_core.swap as sw

LEVELS = {"relu3_1": 1, "relu2_1": 2, "relu1_1": 4}


def _bicubic(x, factor):
    return F.interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False,
                         antialias=factor < 1).clamp(0, 1)


def _direct(lr, refs, extractor, index, score, lr_up=None):
    """Each step of the swap stage written out: features, float64 swaps along ``index``, weight maps."""
    h, w = lr.shape[-2:]
    with torch.no_grad():
        query = extractor(_bicubic(lr, 4) if lr_up is None else lr_up)["relu3_1"]
        keys = [extractor(_bicubic(_bicubic(r, 0.25), 4))["relu3_1"] for r in refs]
        feats = [extractor(r) for r in refs]
    maps = {layer: sw.feature_swap([f[layer].double() for f in feats], index, scale=s,
                                   out_size=(h * s, w * s), backend="torch")
            for layer, s in LEVELS.items()}
    base = F.pad(score[:, None].double(), (1, 1, 1, 1), mode="replicate")
    weights = {layer: F.interpolate(base, scale_factor=s, mode="bicubic", align_corners=False)
               if s > 1 else base for layer, s in LEVELS.items()}
    return query, keys, maps, weights


def _check(result, lr, refs, extractor, lr_up=None):
    b, _, h, w = lr.shape
    assert result.index.shape == result.score.shape == (b, h - 2, w - 2)
    query, keys, maps, weights = _direct(lr, refs, extractor, result.index, result.score, lr_up)
    assert_match(result, exact_match(query, keys))
    for layer, s in LEVELS.items():
        channels = {"relu3_1": 256, "relu2_1": 128, "relu1_1": 64}[layer]
        assert result.maps[layer].shape == (b, channels, h * s, w * s), layer
        assert result.weights[layer].shape == (b, 1, h * s, w * s), layer
        torch.testing.assert_close(result.maps[layer].double(), maps[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.weights[layer].double(), weights[layer], atol=1e-6, rtol=1e-6)


def test_texture_swap_several_refs(backend, real_images, vgg):
    lr, refs = real_images["lr"], real_images["refs"]
    dev = backend.device
    lr, refs = lr.to(dev), [r.to(dev) for r in refs]
    extractor = vgg if dev == "cpu" else copy.deepcopy(vgg).to(dev)  # the fixture is shared
    result = sw.texture_swap(lr, refs, extractor=extractor, backend=backend.name)
    _check(result, lr, refs, extractor)
    n0 = grid(refs[0].shape[-2] // 4, 3, 1, 0) * grid(refs[0].shape[-1] // 4, 3, 1, 0)
    assert (result.index < n0).any() and (result.index >= n0).any(), "both references should be used"
    assert set(result.maps) == set(result.weights) == set(LEVELS)


def test_texture_swap_one_ref_tensor_or_list(real_images, vgg):
    lr, ref = real_images["lr"], real_images["refs"][1]
    a = sw.texture_swap(lr, ref, extractor=vgg)
    b = sw.texture_swap(lr, [ref], extractor=vgg)
    assert torch.equal(a.index, b.index)
    for layer in LEVELS:
        assert torch.equal(a.maps[layer], b.maps[layer])
    _check(a, lr, [ref], vgg)


def test_texture_swap_with_own_hr_as_reference_matches_well(real_images, vgg):
    """The oracle reference (the target's HR): the matches are near perfect."""
    result = sw.texture_swap(real_images["lr"], real_images["hr"], extractor=vgg)
    assert result.score.mean() > 0.9


def test_texture_swap_batch(vgg):
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(2, 3, 8, 10, generator=g)
    refs = [torch.rand(2, 3, 28, 36, generator=g), torch.rand(2, 3, 20, 20, generator=g)]
    result = sw.texture_swap(lr, refs, extractor=vgg)
    _check(result, lr, refs, vgg)
    one = sw.texture_swap(lr[1:], [r[1:] for r in refs], extractor=vgg)
    assert torch.equal(result.index[1:], one.index)


def test_texture_swap_lr_up_override(real_images, vgg):
    lr, refs = real_images["lr"], real_images["refs"]
    lr_up = real_images["hr"]  # match with the HR itself instead of the bicubic LR
    result = sw.texture_swap(lr, refs, extractor=vgg, lr_up=lr_up)
    _check(result, lr, refs, vgg, lr_up=lr_up)


def test_default_extractor_is_bundled_vgg(vgg):
    from srntt_core.models.vgg import VGG19Features

    extractor = sw.default_extractor()
    assert isinstance(extractor, VGG19Features)
    assert sw.default_extractor() is extractor  # shared, built once
    assert set(extractor(torch.rand(1, 3, 8, 8))) >= set(LEVELS)
    for (k, v), (k2, v2) in zip(extractor.state_dict().items(), vgg.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    g = torch.Generator().manual_seed(3)
    lr, ref = torch.rand(1, 3, 6, 7, generator=g), torch.rand(1, 3, 24, 20, generator=g)
    a = sw.texture_swap(lr, ref)
    b = sw.texture_swap(lr, ref, extractor=vgg)
    assert torch.equal(a.index, b.index) and torch.equal(a.maps["relu1_1"], b.maps["relu1_1"])


def test_texture_swapper_module(real_images, vgg):
    lr, refs = real_images["lr"], real_images["refs"]
    swapper = sw.TextureSwapper(extractor=vgg, backend="torch")
    assert isinstance(swapper, torch.nn.Module)
    assert swapper.extractor is vgg
    result = swapper(lr, refs)
    want = sw.texture_swap(lr, refs, extractor=vgg, backend="torch")
    assert torch.equal(result.index, want.index)
    for layer in LEVELS:
        assert torch.equal(result.maps[layer], want.maps[layer])
        assert torch.equal(result.weights[layer], want.weights[layer])


def test_texture_swapper_default_extractor_is_frozen():
    swapper = sw.TextureSwapper()
    assert not any(p.requires_grad for p in swapper.parameters())
    assert "extractor" in dict(swapper.named_children())


# ---------------------------------------------------------------------------------------------
# weight_maps

def test_weight_maps_valid_grid():
    score = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(0))
    maps = sw.weight_maps(score)
    assert [m.shape for m in maps] == [(2, 1, 7, 9), (2, 1, 14, 18), (2, 1, 28, 36)]
    base = maps[0][:, 0]
    assert torch.equal(base[:, 1:-1, 1:-1], score)
    # edge replication, SRNTT's padding of the valid grid to the relu3_1 size
    assert torch.equal(base[:, 0, 1:-1], score[:, 0]) and torch.equal(base[:, -1, 1:-1], score[:, -1])
    assert torch.equal(base[:, 1:-1, 0], score[:, :, 0]) and torch.equal(base[:, 1:-1, -1], score[:, :, -1])
    assert torch.equal(base[:, 0, 0], score[:, 0, 0])
    for m, s in zip(maps[1:], (2, 4), strict=True):
        want = F.interpolate(maps[0], scale_factor=s, mode="bicubic", align_corners=False)
        torch.testing.assert_close(m, want)


def test_weight_maps_same_grid_is_not_padded():
    score = torch.rand(1, 6, 4)
    maps = sw.weight_maps(score, scales=(1, 2), padding=1)
    assert torch.equal(maps[0][:, 0], score)
    assert maps[1].shape == (1, 1, 12, 8)


def test_weight_maps_patch5_pads_two_cells():
    score = torch.rand(1, 4, 5)
    (base,) = sw.weight_maps(score, scales=(1,), patch_size=5)
    assert base.shape == (1, 1, 8, 9)
    assert torch.equal(base[0, 0, 2:-2, 2:-2], score[0])


def test_weight_maps_out_size():
    score = torch.rand(1, 5, 7)
    maps = sw.weight_maps(score, scales=(1, 4), out_size=(9, 8))
    assert maps[0].shape == (1, 1, 9, 8) and maps[1].shape == (1, 1, 36, 32)


def test_weight_maps_constant_score_stays_constant():
    maps = sw.weight_maps(torch.full((1, 4, 6), 0.75))
    for m in maps:
        torch.testing.assert_close(m, torch.full_like(m, 0.75))


def test_weight_maps_are_differentiable():
    score = torch.rand(1, 4, 5, requires_grad=True)
    sum(m.sum() for m in sw.weight_maps(score)).backward()
    assert score.grad is not None and (score.grad != 0).any()


@pytest.mark.parametrize("scales", [(1,), (4, 2, 1), (3,)])
def test_weight_maps_scales(scales):
    maps = sw.weight_maps(torch.rand(1, 5, 5), scales=scales)
    assert [m.shape[-1] for m in maps] == [7 * s for s in scales]


def test_the_public_steps_are_the_swap_stage(real_images, vgg):
    """reference_features / query_features / swap_levels, the steps texture_swap is made of, are
    each the direct computation; a kept ReferenceFeatures gives texture_swap's maps exactly."""
    lr, refs = real_images["lr"], real_images["refs"]
    feats = [sw.reference_features(r, vgg) for r in refs]
    query = sw.query_features(lr, vgg)
    direct_query, direct_keys, _, _ = _direct(lr, refs, vgg, torch.zeros(1, 1, 1, dtype=torch.long),
                                              torch.zeros(1, 1, 1))
    torch.testing.assert_close(query, direct_query, atol=0, rtol=0)
    for f, key, r in zip(feats, direct_keys, refs, strict=True):
        torch.testing.assert_close(f.key, key, atol=0, rtol=0)
        assert f.key.is_contiguous() and all(v.is_contiguous() for v in f.values.values())
        assert set(f.values) == set(LEVELS) and f.values["relu1_1"].shape[-2:] == r.shape[-2:]
    match = sw.patch_match(query, [f.key for f in feats])
    maps = sw.swap_levels([f.values for f in feats], match.index, tuple(lr.shape[-2:]))
    want = sw.texture_swap(lr, refs, extractor=vgg)
    for layer in LEVELS:
        assert torch.equal(maps[layer], want.maps[layer]), layer
    layout = sw.reference_features(refs[0], vgg, channels_last=True)
    torch.testing.assert_close(layout.key, feats[0].key, atol=1e-4, rtol=1e-4)
    assert layout.key.is_contiguous()
