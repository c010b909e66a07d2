"""The compat modules against the algorithms they replace, on the same real inputs, in one run.

For each codebase, ``srntt_core`` (``srntt_core.compat``) and ``original`` (its published algorithm,
written out below in plain torch, N_query x N_ref buffers and all) run on VGG19 features of the
split Sun80 image (conftest's ``real`` inputs; relu3_1 as LR↑ and Ref↓↑, relu3_1/2_1/1_1 of the
reference as values):

- ``ttsr``: TTSR's SearchTransfer (same grid, bmm + max, unfold/gather/fold / 9 at three levels);
- ``c2matching``: C2-Matching / DATSR correspondence matching (per-pixel normalization, reference
  patches / (norm + 1e-5) as conv2d filters, max, / (input norm + 1e-5));
- ``srntt``: SRNTT's conditional multi-layer swap with weights (conv2d argmax, the weight matmul,
  Python paste loops with overlap counts at three levels).

- ``masa``: MASA-SR's coarse-to-fine search and transfer, three providers: ``original`` (the
  rendering in ``tests/test_compat_masa.py``: bmm searches, unfolded windows, fold / overlap count),
  ``srntt_core`` (the drop-in, same blocks and windows) and ``srntt_core-exact`` (full search). MASA
  works on 64-channel encoder features; here the first 64 channels of the same VGG maps stand in
  (relu3_1 of LR↑ cropped to whole 8x8 blocks and of Ref↓↑; Ref relu1_1 / 2_1 / 3_1 as x4 / x2 / x1).

``extra_info`` adds ``index_agreement`` (share of the original's indices that srntt_core reproduces)
and ``peak_mem_mb_isolated``: the peak measured again in a separate process with
``peak_memory.py`` and ``fix_allocator()`` (glibc told to map and unmap every block of
64 KiB or more, so freed memory cannot hide a peak), which leaves this process's allocator, and so
the other benchmarks' timings, untouched. The 1080p shape is skipped: the originals' N x N buffers would need
~67 GB there, and an exact search takes minutes on a CPU.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import peak_memory
import pytest
import torch
import torch.nn.functional as F

from srntt_core.compat.c2matching import correspondence_match
from srntt_core.compat.masa import masa_warp, search_org
from srntt_core.compat.srntt import srntt_swap
from srntt_core.compat.ttsr import SearchTransfer, search_transfer

ROUNDS = {"train": 3, "cufed5": 1}
MODULES = ("ttsr", "c2matching", "srntt")
PROVIDERS = ("srntt_core", "original")
MASA_PROVIDERS = ("srntt_core", "srntt_core-exact", "original")
MASA_CHANNELS = 64  # MASA's nf
HERE = Path(__file__).resolve().parent


def ttsr_original(lrsr_lv3, refsr_lv3, ref_lv1, ref_lv2, ref_lv3):
    b, _, h, w = lrsr_lv3.shape
    key = F.normalize(F.unfold(refsr_lv3, 3, padding=1), dim=1).transpose(1, 2)
    query = F.normalize(F.unfold(lrsr_lv3, 3, padding=1), dim=1)
    best, arg = torch.bmm(key, query).max(dim=1)
    out = [best.view(b, 1, h, w)]
    for level, ref in enumerate((ref_lv3, ref_lv2, ref_lv1)):
        s = 2**level
        cols = F.unfold(ref, 3 * s, padding=s, stride=s)
        picked = cols.gather(2, arg[:, None, :].expand(-1, cols.shape[1], -1))
        out.append(F.fold(picked, (h * s, w * s), 3 * s, padding=s, stride=s) / 9.0)
    return out, arg


def c2matching_original(feat_in, feat_ref):
    indices, values = [], []
    for a, r in zip(feat_in, feat_ref, strict=True):
        c, h, w = a.shape
        a = F.normalize(a.reshape(c, -1), dim=0).view(c, h, w)
        r = F.normalize(r.reshape(c, -1), dim=0).view(c, h, w)
        patches = r.unfold(1, 3, 1).unfold(2, 3, 1).reshape(c, -1, 3, 3).permute(0, 2, 3, 1)
        filters = (patches / (patches.norm(p=2, dim=(0, 1, 2)) + 1e-5)).permute(3, 0, 1, 2)
        max_val, max_idx = F.conv2d(a[None], filters)[0].max(dim=0)
        inp = a.unfold(1, 3, 1).unfold(2, 3, 1).reshape(c, -1, 3, 3)
        max_val = max_val / (inp.norm(p=2, dim=(0, 2, 3)) + 1e-5).view(h - 2, w - 2)
        indices.append(max_idx)
        values.append(max_val)
    return torch.stack(indices), torch.stack(values)


def srntt_original(content, style, condition, other_styles):
    c, h, w = content[0].shape
    patches = condition[0].unfold(1, 3, 1).unfold(2, 3, 1).reshape(c, -1, 3, 3).permute(1, 0, 2, 3)
    norm = patches.flatten(1).norm(dim=1)
    filters = patches / norm.view(-1, 1, 1, 1)
    max_idx = F.conv2d(content, filters)[0].argmax(dim=0)
    query = F.unfold(content, 3)[0]
    weights = ((query / query.norm(dim=0)).t() @ (filters.flatten(1).t())).max(dim=1).values
    maps = []
    gh, gw = max_idx.shape
    for level in [style, *other_styles]:
        r = level.shape[-1] // style.shape[-1]
        win = 3 * r
        ref_patches = level[0].unfold(1, win, r).unfold(2, win, r).reshape(level.shape[1], -1, win, win)
        target = content.new_zeros(level.shape[1], h * r, w * r)
        count = content.new_zeros(h * r, w * r)
        for i in range(gh):
            for j in range(gw):
                target[:, i * r:i * r + win, j * r:j * r + win] += ref_patches[:, max_idx[i, j]]
                count[i * r:i * r + win, j * r:j * r + win] += 1
        maps.append(target / count)
    return maps, weights.view(gh, gw), max_idx


def _inputs(data, shape):
    query, key = data.match_inputs(shape, "real")
    values = data.swap_values(shape, "real")
    return query, key, values["relu3_1"], values["relu2_1"], values["relu1_1"]


def _runner(module, provider, query, key, lv3, lv2, lv1):
    """``(fn, index_of)``: the call to time and how to read the flat match index from its result."""
    if module == "ttsr":
        if provider == "srntt_core":
            st = SearchTransfer()
            return lambda: st(query, key, lv1, lv2, lv3), None
        return lambda: ttsr_original(query, key, lv1, lv2, lv3), lambda out: out[1]
    if module == "c2matching":
        if provider == "srntt_core":
            return lambda: correspondence_match(query, key), lambda out: out.index
        return lambda: c2matching_original(query, key), lambda out: out[0]
    # In SRNTT the condition (Ref↓↑) and the style (Ref) differ; ``key`` stands in for the condition.
    if provider == "srntt_core":
        return lambda: srntt_swap(query, lv3, key, [lv2, lv1], is_weight=True), lambda out: out.index
    return lambda: srntt_original(query, lv3, key, [lv2, lv1]), lambda out: out[2]


def _our_index(module, query, key):
    with torch.no_grad():
        if module == "ttsr":
            return search_transfer(query, key, [])[2]
        return correspondence_match(query, key).index if module == "c2matching" else \
            srntt_swap(query, key, key).index


@functools.cache
def masa_rendering():
    """MASA's published algorithm as the tests write it out (the one rendering of it)."""
    path = HERE.parent / "tests" / "test_compat_masa.py"
    spec = importlib.util.spec_from_file_location("masa_rendering", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _masa_inputs(data, shape):
    query, key = data.match_inputs(shape, "real")
    values = data.swap_values(shape, "real")
    h, w = query.shape[-2:]
    c = MASA_CHANNELS
    fea_lr = query[:, :c, : h // 8 * 8, : w // 8 * 8].contiguous()
    fea_ref = [values[layer][:, :c].contiguous() for layer in ("relu1_1", "relu2_1", "relu3_1")]
    return fea_lr, key[:, :c].contiguous(), fea_ref


def _masa_runner(provider, fea_lr, fea_reflr, fea_ref):
    if provider == "original":
        return lambda: masa_rendering().warp_original(fea_lr, fea_reflr, fea_ref)
    return lambda: masa_warp(fea_lr, fea_reflr, fea_ref, exact=provider == "srntt_core-exact")


def _masa_agreement(fea_lr, fea_reflr, fea_ref, original) -> dict:
    """How the drop-in and the exact mode compare with the original's output ``original``."""
    maps, _, (_, windowed, _), _ = original
    n, _, h, w = fea_lr.shape
    windowed = windowed.view(n, h // 8, w // 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(n, h, w)
    with torch.no_grad():
        ours = masa_warp(fea_lr, fea_reflr, fea_ref)
        exact, _ = search_org(F.pad(fea_lr, (1, 1, 1, 1), mode="replicate"), fea_reflr)
    close = torch.ones(n, h, w, dtype=torch.bool)
    for a, b in zip(ours, maps, strict=True):
        s = a.shape[-1] // w
        diff = (a - b).abs().amax(dim=1)
        close &= F.max_pool2d(diff[:, None], s)[:, 0] <= 1e-4
    gain = exact[..., 0] - windowed
    return {
        "dropin_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(ours, maps, strict=True)),
        "dropin_pixel_agreement": round(close.double().mean().item(), 5),
        "exact_better_match_share": round((gain > 1e-5).double().mean().item(), 5),
        "exact_mean_cosine_gain": round(gain.double().mean().item(), 5),
    }


def measure_peaks(shape: str, family: str) -> None:
    """In a fresh process: peak bytes of every (module, provider) of ``family`` ("masa" or "others")
    at ``shape``, printed as JSON."""
    import types

    import conftest

    data = types.SimpleNamespace(match_inputs=conftest.match_inputs, swap_values=conftest.swap_values)
    peak_memory.fix_allocator()
    query, key, lv3, lv2, lv1 = _inputs(data, shape)
    peaks = {}
    with torch.no_grad():
        inputs = (query, key, lv3, lv2, lv1)
        crops = [t[..., : 8 * s, : 8 * s] for t, s in zip(inputs, (1, 1, 1, 2, 4), strict=True)]
        _runner("ttsr", "srntt_core", *crops)[0]()  # warm-up: the first custom-op call imports torch._dynamo
        if family == "masa":
            masa = _masa_inputs(data, shape)
            for provider in MASA_PROVIDERS:
                peaks[f"masa/{provider}"] = peak_memory.peak_bytes(_masa_runner(provider, *masa))
        else:
            for module in MODULES:
                for provider in PROVIDERS:
                    fn = _runner(module, provider, query, key, lv3, lv2, lv1)[0]
                    peaks[f"{module}/{provider}"] = peak_memory.peak_bytes(fn)
    print(json.dumps(peaks))


@functools.cache
def isolated_peaks(shape: str, family: str = "others") -> dict:
    if not peak_memory.supported():
        return {}
    code = f"import sys; sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]; import bench_compat as b; " \
           f"b.measure_peaks({shape!r}, {family!r})"
    return peak_memory.run_child(code, cwd=str(HERE.parent))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("module", MODULES)
def test_compat(bench, data, shape, module, provider):
    if shape == data.LARGE_SHAPE:
        pytest.skip("1080p: the originals' N x N buffers need ~67 GB; exact search takes minutes on a CPU")
    if data.DEVICE.type != "cpu":
        pytest.skip("the originals are written for CPU tensors here")
    query, key, lv3, lv2, lv1 = _inputs(data, shape)
    h, w = data.SHAPES[shape]
    grid = h * w if module == "ttsr" else (h - 2) * (w - 2)
    if provider == "original":
        data.skip_if_too_big(3 * grid * grid * 4, f"{module}: N x N fp32 buffers")
    fn, index_of = _runner(module, provider, query, key, lv3, lv2, lv1)
    # One warm-up round for srntt_core: its first custom-op call imports torch._dynamo (seconds).
    out = bench.run(fn, group=f"compat {module} {shape}", provider=provider, shape=shape, features="real",
                    n_query=grid, n_key=grid, rounds=ROUNDS[shape], warmup=int(provider == "srntt_core"))
    peak = isolated_peaks(shape).get(f"{module}/{provider}")
    bench.benchmark.extra_info["peak_mem_mb_isolated"] = None if peak is None else round(peak / 2**20, 1)
    if provider == "original":
        theirs = index_of(out).reshape(-1).cpu()
        ours = _our_index(module, query, key).reshape(-1).cpu()
        bench.benchmark.extra_info["index_agreement"] = round((ours == theirs).double().mean().item(), 5)


@pytest.mark.parametrize("provider", MASA_PROVIDERS)
def test_compat_masa(bench, data, shape, provider):
    if shape == data.LARGE_SHAPE:
        pytest.skip("1080p: the original's unfolded x4 windows need ~20 GB")
    if data.DEVICE.type != "cpu":
        pytest.skip("the originals are written for CPU tensors here")
    fea_lr, fea_reflr, fea_ref = _masa_inputs(data, shape)
    n_query = fea_lr.shape[-2] * fea_lr.shape[-1]
    n_key = (fea_reflr.shape[-2] - 2) * (fea_reflr.shape[-1] - 2)
    out = bench.run(_masa_runner(provider, fea_lr, fea_reflr, fea_ref), group=f"compat masa {shape}",
                    provider=provider, shape=shape, features="real", n_query=n_query, n_key=n_key,
                    rounds=ROUNDS[shape], warmup=int(provider != "original"))
    peak = isolated_peaks(shape, "masa").get(f"masa/{provider}")
    bench.benchmark.extra_info["peak_mem_mb_isolated"] = None if peak is None else round(peak / 2**20, 1)
    if provider == "original":
        bench.benchmark.extra_info.update(_masa_agreement(fea_lr, fea_reflr, fea_ref, out))
