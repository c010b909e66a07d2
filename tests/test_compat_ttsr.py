"""srntt_core.compat.ttsr against a plain-torch rendering of TTSR's published search & transfer."""

from __future__ import annotations

import peak_memory
import pytest
import torch
import torch.nn.functional as F
from conftest import load_image
from hypothesis import given, settings
from hypothesis import strategies as st

from srntt_core.compat.ttsr import SearchTransfer, SearchTransformer

MARGIN = 1e-5  # indices are compared where the best cosine beats the runner-up by more than this


# ---------------------------------------------------------------------------------------------
# TTSR, as published: unfold on the same grid, F.normalize, bmm, max over the reference axis;
# values unfolded with kernel 3s / padding s / stride s, gathered, folded, divided by 9.

def ttsr_original(lrsr_lv3, refsr_lv3, ref_lv1, ref_lv2, ref_lv3, index=None):
    """Returns ``(S, [T_lv3, T_lv2, T_lv1], argmax, margin)``; ``index`` overrides the argmax."""
    b, _, h, w = lrsr_lv3.shape
    query = F.normalize(F.unfold(lrsr_lv3, 3, padding=1), dim=1)  # (B, 9C, Nq)
    key = F.normalize(F.unfold(refsr_lv3, 3, padding=1), dim=1)  # (B, 9C, Nk)
    relevance = torch.einsum("bdk,bdq->bkq", key, query)  # the N_ref x N_lr matrix
    best, arg = relevance.max(dim=1)
    top2 = relevance.topk(2, dim=1).values if relevance.shape[1] > 1 else None
    margin = (top2[:, 0] - top2[:, 1]) if top2 is not None else torch.full_like(best, float("inf"))
    if index is not None:
        arg = index.reshape(b, -1)
    textures = []
    for level, ref in enumerate((ref_lv3, ref_lv2, ref_lv1)):
        s = 2**level
        cols = F.unfold(ref, 3 * s, padding=s, stride=s)
        picked = torch.take_along_dim(cols, arg[:, None, :], dim=2)
        textures.append(F.fold(picked, (h * s, w * s), 3 * s, padding=s, stride=s) / 9.0)
    return best.view(b, 1, h, w), textures, arg.view(b, h, w), margin.view(b, h, w)


def compare(inputs, atol=1e-5, min_clear=0.9):
    """Checks SearchTransfer against the rendering: indices where clear, values everywhere."""
    s, *t = SearchTransfer()(*inputs)
    _, _, arg, margin = ttsr_original(*inputs)
    ours_index = _index_of(inputs)
    clear = margin > MARGIN
    assert clear.float().mean() >= min_clear
    assert torch.equal(ours_index[clear], arg[clear])
    # Where the runner-up is within MARGIN both are maxima; value checks use our choice there.
    s_ref, t_ref, _, _ = ttsr_original(*inputs, index=torch.where(clear, arg, ours_index))
    torch.testing.assert_close(s, s_ref, atol=atol, rtol=0)
    for ours, theirs in zip(t, t_ref, strict=True):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=1e-5)


def _index_of(inputs):
    from srntt_core.swap import patch_match

    return patch_match(inputs[0], inputs[1], padding=1).index


def random_inputs(b=2, c=16, h=11, w=13, hr=9, wr=10, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.rand(*shape, generator=g, dtype=dtype)  # noqa: E731
    return (r(b, c, h, w), r(b, c, hr, wr), r(b, c // 4, 4 * hr, 4 * wr), r(b, c // 2, 2 * hr, 2 * wr),
            r(b, c, hr, wr))


def test_random_features_match_ttsr():
    compare(random_inputs())


def test_odd_sized_levels_match_ttsr():
    # Reference levels one pixel wider than 2x / 4x: TTSR's unfold still yields the key grid.
    lr, key, lv1, lv2, lv3 = random_inputs(c=8, h=7, w=9, hr=6, wr=5, seed=3)
    lv1 = torch.cat([lv1, torch.rand(*lv1.shape[:3], 3)], dim=3)
    lv2 = torch.cat([lv2, torch.rand(*lv2.shape[:3], 1)], dim=3)
    compare((lr, key, lv1, lv2, lv3))


def _down_up(x):
    down = F.interpolate(x, scale_factor=0.25, mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(down, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)


@pytest.fixture(scope="module")
def vgg():
    from srntt_core.models.vgg import VGG19Features

    return VGG19Features(("relu1_1", "relu2_1", "relu3_1"))


def test_real_image_features_match_ttsr(vgg):
    # Target and reference: two overlapping crops of one photograph (similar textures).
    hr = load_image("baboon_tl.png", (0, 0, 96, 96))
    ref = load_image("baboon_tl.png", (40, 32, 136, 120))
    with torch.no_grad():
        lr_up, ref_du, ref_f = vgg(_down_up(hr)), vgg(_down_up(ref)), vgg(ref)
    inputs = (lr_up["relu3_1"], ref_du["relu3_1"], ref_f["relu1_1"], ref_f["relu2_1"], ref_f["relu3_1"])
    compare(inputs)


def test_gradients_match_ttsr():
    inputs = [x.requires_grad_() for x in random_inputs(b=1, c=8, h=6, w=7, hr=5, wr=6, dtype=torch.float64)]
    _, _, arg, margin = ttsr_original(*inputs)
    assert bool((margin > MARGIN).all())
    g = torch.Generator().manual_seed(1)
    s, *t = SearchTransfer()(*inputs)
    weights = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in (s, *t)]
    ours = torch.autograd.grad(sum((o * wt).sum() for o, wt in zip((s, *t), weights, strict=True)),
                               inputs)
    s_ref, t_ref, _, _ = ttsr_original(*inputs)
    theirs = torch.autograd.grad(sum((o * wt).sum() for o, wt in zip((s_ref, *t_ref), weights, strict=True)),
                                 inputs)
    names = ("lrsr_lv3", "refsr_lv3", "ref_lv1", "ref_lv2", "ref_lv3")
    for name, a, b in zip(names, ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=name)


def test_search_transformer_is_mmagic_form():
    lr, key, lv1, lv2, lv3 = random_inputs(seed=5)
    s, textures = SearchTransformer()(lr, key, (lv3, lv2, lv1))
    s_ref, t_ref, _, _ = ttsr_original(lr, key, lv1, lv2, lv3)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=0)
    assert [t.shape for t in textures] == [t.shape for t in t_ref]
    # mmagic allows any number of levels: one level is level 3 alone.
    s1, (t1,) = SearchTransformer()(lr, key, (lv3,))
    torch.testing.assert_close(t1, textures[0])


def test_misaligned_level_is_an_error():
    lr, key, lv1, lv2, lv3 = random_inputs()
    with pytest.raises(ValueError, match="values\\[1\\]"):
        SearchTransfer()(lr, key, lv1, lv2[..., :-2], lv3)
    with pytest.raises(TypeError, match="refs"):
        SearchTransformer()(lr, key, lv3)


def test_no_parameters_so_checkpoints_load():
    assert list(SearchTransfer().parameters()) == []
    assert SearchTransfer().state_dict() == {}


# ---------------------------------------------------------------------------------------------
# memory: the original holds the N_ref x N_lr relevance matrix; the compat module must not.

MEMORY_SIZE = 64  # a 64 x 64 level 3: N = 4096 cells, the relevance matrix is 64 MiB in fp32


@pytest.mark.skipif(not peak_memory.supported(), reason="needs Linux, glibc and /proc/self/clear_refs")
@pytest.mark.skipif(not peak_memory.kernels_available(), reason=peak_memory.KERNELS_REASON)
def test_memory_is_far_below_the_relevance_matrix():
    n = MEMORY_SIZE
    inputs = random_inputs(b=1, c=8, h=n, w=n, hr=n, wr=n)
    module = SearchTransfer()
    with torch.no_grad():
        ours = peak_memory.peak_bytes(lambda: module(*inputs))
        original = peak_memory.peak_bytes(lambda: ttsr_original(*inputs)[:2])
    nxn = (n * n) ** 2 * 4
    assert original >= nxn  # the N x N relevance matrix really is there
    assert ours < nxn / 8


# ---------------------------------------------------------------------------------------------
# registration hooks (srntt_core.compat.registry), with stand-ins for the frameworks' registries

class _BasicSRRegistry:
    """BasicSR's Registry surface: ``register(obj)`` by class name, ``in``, ``get``."""

    def __init__(self):
        self._obj_map = {}

    def __contains__(self, name):
        return name in self._obj_map

    def register(self, obj):
        assert obj.__name__ not in self._obj_map
        self._obj_map[obj.__name__] = obj

    def get(self, name):
        return self._obj_map[name]


class _MMRegistry:
    """mmengine's Registry surface: ``register_module(name=, module=, force=)`` and ``build``."""

    def __init__(self):
        self.modules = {}

    def register_module(self, name=None, force=False, module=None):
        if name in self.modules and not force:
            raise KeyError(f"{name} is already registered")
        self.modules[name] = module

    def build(self, cfg):
        cfg = dict(cfg)
        return self.modules[cfg.pop("type")](**cfg)


def test_registration_hooks_without_importing_the_frameworks():
    import importlib
    import sys

    from srntt_core.compat import registry

    frameworks = ("basicsr", "mmagic", "mmedit", "mmengine", "mmcv")
    loaded = {name for name in sys.modules if name.split(".")[0] in frameworks}
    importlib.reload(registry)  # re-runs the module's imports
    assert {name for name in sys.modules if name.split(".")[0] in frameworks} == loaded
    basic = registry.register_basicsr(_BasicSRRegistry())
    arch = basic.get("SRNTTCoreSearchTransfer")(backend="torch")
    assert isinstance(arch, SearchTransfer) and arch.backend == "torch"
    registry.register_basicsr(basic)  # registering twice leaves the first registration alone
    mm = registry.register_mmagic(_MMRegistry())
    module = mm.build({"type": "SRNTTCoreSearchTransformer"})
    lr, key, lv1, lv2, lv3 = random_inputs(b=1, c=4, h=5, w=6, hr=4, wr=5)
    s, textures = module(lr, key, (lv3, lv2, lv1))
    assert s.shape == (1, 1, 5, 6) and len(textures) == 3
    with pytest.raises(KeyError):
        registry.register_mmagic(mm)
    registry.register_mmagic(mm, force=True)
    assert "SRNTTCoreCorrespondenceMatcher" in mm.modules


@settings(max_examples=12, deadline=None)
@given(h=st.integers(1, 7), w=st.integers(1, 7), hr=st.integers(1, 6), wr=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_random_shapes_match_ttsr(h, w, hr, wr, seed):
    compare(random_inputs(b=1, c=4, h=h, w=w, hr=hr, wr=wr, seed=seed), min_clear=0.0)


def test_non_contiguous_inputs():
    lr, key, lv1, lv2, lv3 = random_inputs(c=8, seed=7)
    flipped = [x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in (lr, key, lv1, lv2, lv3)]
    assert not flipped[0].is_contiguous()
    outputs = SearchTransfer()(*flipped)
    for ours, theirs in zip(outputs, SearchTransfer()(lr, key, lv1, lv2, lv3), strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_returns_the_input_dtype(dtype):
    # TTSR's S comes out of its bmm in the inputs' dtype; ours is computed in float32, then cast.
    inputs = [x.to(dtype) for x in random_inputs(b=1, c=8, seed=8)]
    s, *t = SearchTransfer()(*inputs)
    assert s.dtype == dtype and all(x.dtype == dtype for x in t)
    s32, *_ = SearchTransfer()(*[x.float() for x in inputs])
    assert torch.equal(s, s32.to(dtype))
    mm_s, _ = SearchTransformer()(inputs[0], inputs[1], (inputs[4], inputs[3], inputs[2]))
    assert mm_s.dtype == dtype
