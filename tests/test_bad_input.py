"""docs/CONTRACT.md §6: every bad input gets a ValueError/TypeError whose message names the argument.

NaN/Inf: decided in srntt_core.swap and tested here. patch_match (and texture_swap) raise: a NaN
descriptor would make the argmax depend on a kernel's loop order. feature_swap propagates: it is a
linear copy, so a non-finite value lands exactly where the windows that read it land (an extra
full pass over the values to check them cost more than the swap itself).
"""

import pytest
import torch
from conftest import features

import srntt_core.swap as sw


def _q(*shape, **kw):
    return features(*(shape or (1, 4, 8, 9)), seed=1, **kw)


def _k(*shape, **kw):
    return features(*(shape or (1, 4, 7, 10)), seed=2, **kw)


def _fill(t, dim, i, value):
    return t.index_fill(dim, torch.tensor([i]), value)


def _raises(exc, name, fn, *args, **kwargs):
    """``fn`` raises ``exc`` and its message names ``name``."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert name in str(info.value), f"{name!r} not named in: {info.value}"
    return info.value


# ---------------------------------------------------------------------------------------------
# patch_match

PATCH_MATCH_BAD = [
    # (id, exception, named argument, query, key, kwargs)
    ("query-3d", ValueError, "query", lambda: _q()[0], lambda: _k(), {}),
    ("query-5d", ValueError, "query", lambda: _q()[None], lambda: _k(), {}),
    ("key-3d", ValueError, "key", lambda: _q(), lambda: _k()[0], {}),
    ("key1-2d", ValueError, "key[1]", lambda: _q(), lambda: [_k(), _k()[0, 0]], {}),
    ("query-not-tensor", TypeError, "query", lambda: _q().numpy(), lambda: _k(), {}),
    ("key-not-tensor", TypeError, "key", lambda: _q(), lambda: "key", {}),
    ("key1-not-tensor", TypeError, "key[1]", lambda: _q(), lambda: [_k(), None], {}),
    ("channel-mismatch", ValueError, "key", lambda: _q(1, 4, 8, 9), lambda: _k(1, 5, 7, 10), {}),
    ("channel-mismatch-key1", ValueError, "key[1]", lambda: _q(), lambda: [_k(), _k(1, 3, 7, 10)], {}),
    ("batch-mismatch", ValueError, "key", lambda: _q(2, 4, 8, 9), lambda: _k(1, 4, 7, 10), {}),
    ("query-int", TypeError, "query", lambda: _q().to(torch.int64), lambda: _k(), {}),
    ("query-uint8", TypeError, "query", lambda: _q().to(torch.uint8), lambda: _k(), {}),
    ("key-int32", TypeError, "key", lambda: _q(), lambda: _k().to(torch.int32), {}),
    ("query-bool", TypeError, "query", lambda: _q() > 0, lambda: _k(), {}),
    ("key1-bool", TypeError, "key[1]", lambda: _q(), lambda: [_k(), _k() > 0], {}),
    ("query-complex", TypeError, "query", lambda: _q().to(torch.complex64), lambda: _k(), {}),
    ("query-empty-h", ValueError, "query", lambda: _q(1, 4, 0, 9), lambda: _k(), {}),
    ("query-empty-c", ValueError, "query", lambda: _q(1, 0, 8, 9), lambda: _k(1, 0, 7, 10), {}),
    ("query-empty-b", ValueError, "query", lambda: _q(0, 4, 8, 9), lambda: _k(0, 4, 7, 10), {}),
    ("key-empty", ValueError, "key", lambda: _q(), lambda: _k(1, 4, 7, 0), {}),
    ("key-empty-list", ValueError, "key", lambda: _q(), lambda: [], {}),
    ("key-smaller-than-patch", ValueError, "key", lambda: _q(), lambda: _k(1, 4, 2, 10), {}),
    ("key1-smaller-than-patch", ValueError, "key[1]", lambda: _q(), lambda: [_k(), _k(1, 4, 7, 2)], {}),
    ("key-smaller-than-patch5-same", ValueError, "key", lambda: _q(), lambda: _k(1, 4, 7, 2),
     dict(patch_size=5, padding=1)),
    ("query-smaller-than-patch", ValueError, "query", lambda: _q(1, 4, 2, 2), lambda: _k(), {}),
    ("patch-size-0", ValueError, "patch_size", lambda: _q(), lambda: _k(), dict(patch_size=0)),
    ("patch-size-negative", ValueError, "patch_size", lambda: _q(), lambda: _k(), dict(patch_size=-3)),
    ("patch-size-float", TypeError, "patch_size", lambda: _q(), lambda: _k(), dict(patch_size=3.0)),
    ("patch-size-str", TypeError, "patch_size", lambda: _q(), lambda: _k(), dict(patch_size="3")),
    ("patch-size-bool", TypeError, "patch_size", lambda: _q(), lambda: _k(), dict(patch_size=True)),
    ("patch-size-tensor", TypeError, "patch_size", lambda: _q(), lambda: _k(),
     dict(patch_size=torch.tensor(3.0))),
    ("stride-0", ValueError, "stride", lambda: _q(), lambda: _k(), dict(stride=0)),
    ("stride-float", TypeError, "stride", lambda: _q(), lambda: _k(), dict(stride=1.5)),
    ("padding-negative", ValueError, "padding", lambda: _q(), lambda: _k(), dict(padding=-1)),
    ("padding-float", TypeError, "padding", lambda: _q(), lambda: _k(), dict(padding=1.0)),
    ("query-nan", ValueError, "query", lambda: _fill(_q(), 2, 3, float("nan")),
     lambda: _k(), {}),
    ("query-inf", ValueError, "query", lambda: _fill(_q(), 3, 0, float("inf")),
     lambda: _k(), {}),
    ("key-neg-inf", ValueError, "key", lambda: _q(), lambda: _fill(_k(), 2, 6, -float("inf")),
     {}),
    ("key1-nan", ValueError, "key[1]", lambda: _q(),
     lambda: [_k(), _fill(_k(), 1, 2, float("nan"))], {}),
    ("query-nan-float16", ValueError, "query", lambda: _fill(_q().half(), 2, 0, float("nan")),
     lambda: _k(), {}),
    ("unknown-backend", ValueError, "backend", lambda: _q(), lambda: _k(), dict(backend="gpu")),
    ("backend-not-str", TypeError, "backend", lambda: _q(), lambda: _k(), dict(backend=1)),
    ("unknown-precision", ValueError, "precision", lambda: _q(), lambda: _k(), dict(precision="low")),
    ("precision-not-str", ValueError, "precision", lambda: _q(), lambda: _k(), dict(precision=None)),
]


@pytest.mark.parametrize("exc, name, make_query, make_key, kwargs",
                         [pytest.param(*case[1:], id=case[0]) for case in PATCH_MATCH_BAD])
def test_patch_match_rejects(exc, name, make_query, make_key, kwargs):
    _raises(exc, name, sw.patch_match, make_query(), make_key(), **kwargs)


def test_patch_match_mixed_devices():
    """A key on another device than the query. Without a GPU the other device is "meta"."""
    other = "cuda" if torch.cuda.is_available() else "meta"
    _raises(ValueError, "key", sw.patch_match, _q(), _k().to(other))
    _raises(ValueError, "key[1]", sw.patch_match, _q(), [_k(), _k().to(other)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_patch_match_query_on_gpu_key_on_cpu():
    _raises(ValueError, "key", sw.patch_match, _q().cuda(), _k())


def test_patch_match_nan_checked_on_every_backend(backend):
    query = _fill(_q(), 2, 3, float("nan")).to(backend.device)
    _raises(ValueError, "query", sw.patch_match, query, _k().to(backend.device), backend=backend.name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_feature_swap_propagates_non_finite(backend, bad, reduce):
    """A non-finite value shows up in exactly the output pixels whose chosen windows read it (the
    indicator of that pixel swapped with reduce="sum" is > 0), and the other pixels are unchanged."""
    dev = backend.device
    clean = _v(1, 3, 14, 20).to(dev)
    values = [clean, _v(1, 3, 9, 8).to(dev)]
    values[1][0, 1, 4, 2] = bad  # one pixel of channel 1 of the second reference
    index = _index(1, 8, 9, high=12 * 18 + 7 * 6).to(dev)
    index[0, 3, 4] = 12 * 18 + 2 * 6 + 1  # make sure some window reads it
    out = sw.feature_swap(values, index, reduce=reduce, backend=backend.name)
    marker = [torch.zeros_like(clean), torch.zeros_like(values[1])]
    marker[1][0, 1, 4, 2] = 1.0
    hit = sw.feature_swap(marker, index, reduce="sum", backend="torch")[0, 1] > 0
    assert hit.any()
    bad_out = ~torch.isfinite(out[0, 1])
    assert torch.equal(bad_out, hit)
    finite_values = [clean, values[1].nan_to_num(0.0, 0.0, 0.0)]
    ref = sw.feature_swap(finite_values, index, reduce=reduce, backend="torch")
    mask = ~hit
    torch.testing.assert_close(out[0, 1][mask], ref[0, 1][mask])
    torch.testing.assert_close(out[:, [0, 2]], ref[:, [0, 2]])


def test_patch_match_accepts_numpy_ints_for_sizes():
    import numpy as np

    a = sw.patch_match(_q(), _k(), patch_size=np.int64(3), stride=np.int32(1), padding=np.int16(1))
    b = sw.patch_match(_q(), _k(), patch_size=3, stride=1, padding=1)
    assert torch.equal(a.index, b.index)


def test_patch_match_inputs_are_not_modified():
    query, key = _q(), _k()
    q0, k0 = query.clone(), key.clone()
    sw.patch_match(query, [key, key], padding=1)
    assert torch.equal(query, q0) and torch.equal(key, k0)


# ---------------------------------------------------------------------------------------------
# feature_swap

def _v(*shape, **kw):
    return features(*(shape or (1, 3, 7, 10)), seed=3, **kw)


def _index(b=1, h=6, w=7, high=40):  # the valid grid of a 7x10 map has 5*8 = 40 cells
    return torch.randint(0, high, (b, h, w), generator=torch.Generator().manual_seed(0))


FEATURE_SWAP_BAD = [
    # (id, exception, named argument, values, index, kwargs)
    ("values-3d", ValueError, "values", lambda: _v()[0], lambda: _index(), {}),
    ("values1-3d", ValueError, "values[1]", lambda: [_v(), _v()[0]], lambda: _index(), {}),
    ("values-not-tensor", TypeError, "values", lambda: 1.0, lambda: _index(), {}),
    ("values-empty-list", ValueError, "values", lambda: [], lambda: _index(), {}),
    ("values-int", TypeError, "values", lambda: _v().to(torch.int64), lambda: _index(), {}),
    ("values-bool", TypeError, "values", lambda: _v() > 0, lambda: _index(), {}),
    ("values-empty", ValueError, "values", lambda: _v(1, 3, 0, 10), lambda: _index(), {}),
    ("values1-channels", ValueError, "values[1]", lambda: [_v(), _v(1, 4, 7, 10)], lambda: _index(), {}),
    ("values1-batch", ValueError, "values[1]", lambda: [_v(), _v(2, 3, 7, 10)], lambda: _index(), {}),
    ("values-smaller-than-patch", ValueError, "values", lambda: _v(1, 3, 2, 10), lambda: _index(high=1), {}),
    ("values-smaller-than-scale", ValueError, "values", lambda: _v(1, 3, 3, 10), lambda: _index(high=1),
     dict(scale=4)),
    ("index-not-tensor", TypeError, "index", lambda: _v(), lambda: [[0]], {}),
    ("index-float", TypeError, "index", lambda: _v(), lambda: _index().float(), {}),
    ("index-bool", TypeError, "index", lambda: _v(), lambda: _index() > 0, {}),
    ("index-2d", ValueError, "index", lambda: _v(), lambda: _index()[0], {}),
    ("index-4d", ValueError, "index", lambda: _v(), lambda: _index()[None], {}),
    ("index-empty", ValueError, "index", lambda: _v(), lambda: _index(1, 0, 7), {}),
    ("index-negative", ValueError, "index", lambda: _v(), lambda: _index() - 41, {}),
    ("index-too-large", ValueError, "index", lambda: _v(), lambda: _fill(_index(), 1, 2, 40),
     {}),
    ("index-huge", ValueError, "index", lambda: _v(), lambda: _fill(_index(), 2, 0, 2**40),
     {}),
    # An index of the same (padding=1) grid, 7*10 = 70 cells, used with the valid grid's 40.
    ("index-of-the-wrong-grid", ValueError, "index", lambda: _v(), lambda: _fill(_index(high=70), 1, 0, 69),
     {}),
    # An index over two references, used with one of them.
    ("index-of-more-references", ValueError, "index", lambda: _v(), lambda: _fill(_index(high=80), 1, 0, 79),
     {}),
    ("index-wrong-batch", ValueError, "index", lambda: _v(), lambda: _index(b=2), {}),
    ("patch-size-0", ValueError, "patch_size", lambda: _v(), lambda: _index(), dict(patch_size=0)),
    ("patch-size-float", TypeError, "patch_size", lambda: _v(), lambda: _index(), dict(patch_size=3.0)),
    ("stride-0", ValueError, "stride", lambda: _v(), lambda: _index(), dict(stride=0)),
    ("padding-negative", ValueError, "padding", lambda: _v(), lambda: _index(), dict(padding=-2)),
    ("scale-0", ValueError, "scale", lambda: _v(), lambda: _index(), dict(scale=0)),
    ("scale-float", TypeError, "scale", lambda: _v(), lambda: _index(), dict(scale=2.0)),
    ("unknown-reduce", ValueError, "reduce", lambda: _v(), lambda: _index(), dict(reduce="max")),
    ("reduce-not-str", ValueError, "reduce", lambda: _v(), lambda: _index(), dict(reduce=None)),
    ("unknown-backend", ValueError, "backend", lambda: _v(), lambda: _index(), dict(backend="mps2")),
    ("out-size-zero", ValueError, "out_size", lambda: _v(), lambda: _index(), dict(out_size=(0, 5))),
    ("out-size-float", TypeError, "out_size", lambda: _v(), lambda: _index(), dict(out_size=(8.0, 9))),
    ("out-size-int", TypeError, "out_size", lambda: _v(), lambda: _index(), dict(out_size=8)),
    ("out-size-three", TypeError, "out_size", lambda: _v(), lambda: _index(), dict(out_size=(8, 9, 1))),
    ("default-out-size-empty", ValueError, "out_size", lambda: _v(), lambda: _index(h=1, w=1),
     dict(patch_size=1, padding=1)),
]


@pytest.mark.parametrize("exc, name, make_values, make_index, kwargs",
                         [pytest.param(*case[1:], id=case[0]) for case in FEATURE_SWAP_BAD])
def test_feature_swap_rejects(exc, name, make_values, make_index, kwargs):
    _raises(exc, name, sw.feature_swap, make_values(), make_index(), **kwargs)


def test_feature_swap_mixed_devices():
    other = "cuda" if torch.cuda.is_available() else "meta"
    _raises(ValueError, "index", sw.feature_swap, _v(), _index().to(other))
    _raises(ValueError, "values[1]", sw.feature_swap, [_v(), _v().to(other)], _index(high=80))


def test_feature_swap_index_range_checked_on_every_backend(backend):
    index = _fill(_index(), 1, 2, 40).to(backend.device)
    _raises(ValueError, "index", sw.feature_swap, _v().to(backend.device), index, backend=backend.name)


def test_feature_swap_index_at_the_boundary_is_fine(backend):
    """The largest valid index (last cell of the last reference) is accepted."""
    index = _fill(_index(high=80), 1, 0, 79).to(backend.device)
    out = sw.feature_swap([_v().to(backend.device), _v().to(backend.device)], index, backend=backend.name)
    assert out.shape == (1, 3, 8, 9)


# ---------------------------------------------------------------------------------------------
# helpers

@pytest.mark.parametrize("score, exc", [
    pytest.param(lambda: torch.rand(1, 5, 6).long(), TypeError, id="int"),
    pytest.param(lambda: [[0.5]], TypeError, id="not-a-tensor"),
    pytest.param(lambda: torch.rand(1, 1, 5, 6), ValueError, id="4d"),
    pytest.param(lambda: torch.rand(1, 0, 6), ValueError, id="empty"),
])
def test_weight_maps_rejects_bad_score(score, exc):
    _raises(exc, "score", sw.weight_maps, score())


def test_weight_maps_rejects_bad_scales():
    _raises(ValueError, "scales", sw.weight_maps, torch.rand(1, 5, 6), scales=(1, 0))
    _raises(TypeError, "scales", sw.weight_maps, torch.rand(1, 5, 6), scales=(1.5,))


@pytest.mark.parametrize("lr, refs, name", [
    pytest.param(lambda: torch.rand(1, 1, 8, 8), lambda: torch.rand(1, 3, 32, 32), "lr", id="lr-grey"),
    pytest.param(lambda: torch.rand(3, 8, 8), lambda: torch.rand(1, 3, 32, 32), "lr", id="lr-3d"),
    pytest.param(lambda: torch.rand(1, 3, 8, 8), lambda: torch.rand(1, 3, 30, 32), "refs", id="ref-not-mod4"),
    pytest.param(lambda: torch.rand(1, 3, 8, 8), lambda: [torch.rand(1, 3, 32, 32), torch.rand(1, 1, 32, 32)],
                 "refs[1]", id="ref1-grey"),
    pytest.param(lambda: torch.rand(1, 3, 8, 8), lambda: torch.rand(2, 3, 32, 32), "refs", id="ref-batch"),
    pytest.param(lambda: torch.rand(1, 3, 8, 8), lambda: torch.rand(1, 3, 32, 32).index_fill(
        2, torch.tensor([3]), float("nan")), "refs", id="ref-nan"),
    pytest.param(lambda: torch.rand(1, 3, 8, 8), lambda: [], "refs", id="no-refs"),
])
def test_texture_swap_rejects(lr, refs, name):
    identity = torch.nn.Identity()  # never reached: validation comes first
    _raises(ValueError, name, sw.texture_swap, lr(), refs(), extractor=identity)
