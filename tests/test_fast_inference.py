"""The fast inference path: BatchNorm folding, shared reference features, exactness against the
straightforward path (same weights, BN unfolded, nothing cached), lazy imports."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srntt_core.cli import SAMPLE_IMAGE
from srntt_core.models import infer as I
from srntt_core.models.fuse import fast_generator, fold_batchnorm, has_batchnorm, inference_copy
from srntt_core.models.metrics import psnr_y
from srntt_core.models.srntt import SRNTT
from srntt_core.ops import winograd

ZEBRA = SAMPLE_IMAGE
TEST_IMAGES = Path(__file__).resolve().parent / "data" / "images"
TINY = dict(ch=8, content_blocks=2, transfer_blocks=(1, 1, 1))


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def zebra():
    from PIL import Image

    arr = np.asarray(Image.open(ZEBRA).convert("RGB"), dtype=np.float32) / 255.0
    img = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    hr = img[:, 40:168, 60:252]  # 128 x 192
    ref = img[:, 200:328, 300:492]
    lr = F.interpolate(hr[None], scale_factor=0.25, mode="bicubic", align_corners=False,
                       antialias=True).clamp(0, 1)[0]
    return hr, lr, ref


@pytest.fixture(scope="module")
def bundled():
    return I.load_model()


def test_fold_batchnorm_returns_a_folded_copy_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = _randomize_bn(SRNTT(**TINY)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert has_batchnorm(model) and not has_batchnorm(folded)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2 * 2 + 1 + 3 * (2 + 1)
    lr = torch.rand(1, 3, 12, 16) * 2 - 1
    maps = {"relu3_1": torch.rand(1, 256, 12, 16), "relu2_1": torch.rand(1, 128, 24, 32),
            "relu1_1": torch.rand(1, 64, 48, 64)}
    with torch.no_grad():
        torch.testing.assert_close(folded(lr, maps), model(lr, maps), atol=1e-5, rtol=0)


def test_fold_batchnorm_folds_eval_statistics_even_from_a_training_model():
    torch.manual_seed(1)
    model = _randomize_bn(SRNTT(**TINY)).train()
    folded = fold_batchnorm(model)
    assert model.training and not folded.training
    lr = torch.rand(2, 3, 12, 12) * 2 - 1
    maps = {"relu3_1": torch.rand(2, 256, 12, 12), "relu2_1": torch.rand(2, 128, 24, 24),
            "relu1_1": torch.rand(2, 64, 48, 48)}
    with torch.no_grad():
        torch.testing.assert_close(folded(lr, maps), model.eval()(lr, maps), atol=1e-5, rtol=0)


def test_fold_batchnorm_refuses_a_batchnorm_it_cannot_fold():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="BatchNorm2d not preceded by a Conv2d"):
        fold_batchnorm(model)


def test_inference_copy_is_frozen_and_channels_last():
    model = SRNTT(**TINY)
    fast = inference_copy(model, channels_last=True)
    assert not any(p.requires_grad for p in fast.parameters())
    assert all(p.requires_grad for p in model.parameters())
    conv = fast.get_submodule("texture_transfer.large_in.0")
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_fast_path_matches_the_straightforward_path(bundled, zebra):
    """Within 1e-4 per pixel in [0, 1], and the same PSNR to 0.01 dB (untiled and tiled)."""
    hr, lr, ref = zebra
    assert has_batchnorm(bundled)
    slow = I.super_resolve(bundled, lr, [ref], fast=False, tile=None)
    fast = I.super_resolve(bundled, lr, [ref], tile=None)
    assert (fast - slow).abs().max() <= 1e-4
    assert abs(psnr_y(fast[None], hr[None]) - psnr_y(slow[None], hr[None])) < 0.01
    tiled_slow = I.super_resolve(bundled, lr, [ref], fast=False, tile=24, overlap=4)
    tiled_fast = I.super_resolve(bundled, lr, [ref], tile=24, overlap=4)
    assert (tiled_fast - tiled_slow).abs().max() <= 1e-4
    assert has_batchnorm(bundled)  # the loaded model keeps its BatchNorm


def test_a_reference_bank_is_shared_across_inputs(zebra):
    """Passing a ReferenceBank reuses its features: no VGG pass over the reference again."""
    hr, lr, ref = zebra
    torch.manual_seed(2)
    model = _randomize_bn(SRNTT(**TINY)).eval()
    bank = I.ReferenceBank([I.prepare_reference(ref)], channels_last=True)  # as super_resolve builds it
    calls = []
    hook = bank.extractor.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape[-2:])))
    try:
        outs = [I.super_resolve(model, x, bank, tile=None) for x in (lr, lr.flip(-1))]
    finally:
        hook.remove()
    assert calls == [(4 * lr.shape[-2], 4 * lr.shape[-1])] * 2  # the two LR↑ queries only
    for x, out in zip((lr, lr.flip(-1)), outs, strict=True):
        torch.testing.assert_close(out, I.super_resolve(model, x, [ref], tile=None), atol=0, rtol=0)


def test_import_swap_and_build_the_extractor_stay_light(tmp_path):
    """Neither ``import srntt_core.swap``, building the VGG extractor nor loading the generator loads
    torchvision, Triton, matplotlib, PIL, torch._dynamo or training code (start-up time of
    ``srntt sr``; tqdm comes with torch.hub)."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text("")  # importable, so an import attempt shows in sys.modules
    code = (
        "import sys; import srntt_core.swap as sw; sw.default_extractor(); "
        "import srntt_core.models.infer as I; I.load_model(); "
        "heavy = ['torchvision', 'triton', 'kernels', 'matplotlib', 'PIL', 'srntt_core.models.train', "
        "'srntt_core.models.losses', 'torch._dynamo']; "
        "print([m for m in heavy if m in sys.modules])"
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# the folded copy is built once per model, and rebuilt when the weights change

def _tiny_bn_model(seed: int) -> SRNTT:
    """A tiny SRNTT with trained-like BN statistics and a non-zero output layer (a fresh one is
    zero-initialized, which would hide every other weight from the output)."""
    torch.manual_seed(seed)
    model = _randomize_bn(SRNTT(**TINY), seed).eval()
    last = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.normal_(0, 0.1)
    return model


def test_the_folded_copy_is_built_once_per_model(monkeypatch, zebra):
    from srntt_core.models import fuse

    built = []
    real = fuse.inference_copy
    monkeypatch.setattr(fuse, "inference_copy", lambda *a, **k: built.append(1) or real(*a, **k))
    model = _tiny_bn_model(3)
    _, lr, ref = zebra
    first = I.super_resolve(model, lr, [ref], tile=None)
    second = I.super_resolve(model, lr, [ref], tile=None)
    I.super_resolve(model, lr, [ref], tile=24, overlap=4)
    assert len(built) == 1
    assert fuse.fast_generator(model) is fuse.fast_generator(model)
    torch.testing.assert_close(second, first, atol=0, rtol=0)


@pytest.mark.parametrize("change", ["optimizer_step", "data_write", "load_state_dict", "bn_statistics"])
def test_a_changed_weight_is_seen(zebra, change):
    """A training loop that validates between steps gets the current weights, however they changed."""
    _, lr, ref = zebra
    lr = lr[:, :16, :16]
    model = _tiny_bn_model(4)
    before = I.super_resolve(model, lr, [ref], tile=None)
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]
    if change == "optimizer_step":
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        model.train()
        with torch.enable_grad():
            out = model(lr[None] * 2 - 1, I.ReferenceBank([I.prepare_reference(ref)]).swap(lr[None]))
            out.mean().backward()
        opt.step()
        model.eval()
    elif change == "data_write":
        last.bias.data.add_(0.1)
    elif change == "load_state_dict":
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state[f"{name}.bias"] += 0.1
        model.load_state_dict(state)
    else:  # a training-mode forward updates BatchNorm's running statistics (no version bump)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0
        model.train()
        model(lr[None] * 4 - 2, I.ReferenceBank([I.prepare_reference(ref)]).swap(lr[None]))
        model.eval()
    after = I.super_resolve(model, lr, [ref], tile=None)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, I.super_resolve(model, lr, [ref], tile=None, fast=False),
                               atol=1e-4, rtol=0)


def test_the_cache_does_not_keep_a_model_alive(zebra):
    import gc
    import weakref

    from srntt_core.models import fuse

    _, lr, ref = zebra
    model = _tiny_bn_model(5)
    I.super_resolve(model, lr[:, :12, :12], [ref], tile=None)
    alive = weakref.ref(model)
    assert model in fuse._CACHE
    del model
    gc.collect()
    assert alive() is None


# ---------------------------------------------------------------------------------------------
# opt-in: torch.compile, bfloat16 networks

@pytest.mark.slow
def test_compile_matches_the_fast_path_and_is_kept_per_model(zebra):
    import torch._dynamo

    from srntt_core.models import fuse

    _, lr, ref = zebra
    lr = lr[:, :12, :16]
    torch.manual_seed(6)
    model = _randomize_bn(SRNTT(ch=4, content_blocks=1, transfer_blocks=(1, 1, 1)), 6).eval()
    eager = I.super_resolve(model, lr, [ref], tile=None)
    torch._dynamo.reset()
    compiled = I.super_resolve(model, lr, [ref], tile=None, compile=True)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    again = I.super_resolve(model, lr, [ref], tile=None, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompile for one shape
    torch.testing.assert_close(again, compiled, atol=0, rtol=0)
    compiled_generator = fuse.fast_generator(model, compile_mode="default")
    assert compiled_generator is fuse.fast_generator(model, compile_mode="default")
    with pytest.raises(ValueError, match="compile"):
        I.super_resolve(model, lr, [ref], tile=None, compile=True, fast=False)


def test_medium_precision_runs_the_networks_in_bfloat16(zebra):
    _, lr, ref = zebra
    lr = lr[:, :16, :16]
    model = _tiny_bn_model(7)
    dtypes = []
    conv = fast_generator(model).get_submodule("texture_transfer.large_in.0")
    hook = conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    try:
        medium = I.super_resolve(model, lr, [ref], tile=None, precision="medium")
        highest = I.super_resolve(model, lr, [ref], tile=None)
    finally:
        hook.remove()
    assert dtypes == [torch.bfloat16, torch.float32]
    assert medium.dtype == torch.float32 and medium.shape == highest.shape
    assert 0 < (medium - highest).abs().mean() < 0.02
    with pytest.raises(ValueError, match="precision"):
        I.super_resolve(model, lr, [ref], tile=None, precision="low")


# ---------------------------------------------------------------------------------------------
# srntt eval, both ways

def test_eval_fast_and_straightforward_give_the_same_psnr(tmp_path):
    """``srntt eval --straightforward`` runs the model as given; the table agrees to 0.01 dB."""
    import csv
    import shutil

    from srntt_core.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for name in ("zebra_target.png", "baboon_tl.png"):
        shutil.copy(TEST_IMAGES / name, images / name)
    psnr = {}
    for way, flags in (("fast", []), ("straightforward", ["--straightforward"])):
        table = tmp_path / f"{way}.csv"
        assert main(["eval", str(images), "--rows", "srntt_ref", "--device", "cpu",
                     "--tile", "24", "--overlap", "4", "--csv", str(table), *flags]) == 0
        with open(table) as f:
            psnr[way] = {r["name"]: float(r["srntt_ref_psnr"]) for r in csv.DictReader(f)}
    assert psnr["fast"].keys() == psnr["straightforward"].keys() and len(psnr["fast"]) == 2
    for name, fast in psnr["fast"].items():
        assert abs(fast - psnr["straightforward"][name]) < 0.01, (name, fast, psnr["straightforward"][name])


# ---------------------------------------------------------------------------------------------
# oneDNN fusion of the convolutions (CPU)

def _graph_ops(gm) -> list:
    return [n.target if n.op == "call_function" else type(gm.get_submodule(n.target)).__name__
            for n in gm.graph.nodes if n.op in ("call_function", "call_module")]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs torch's oneDNN (mkldnn)")
def test_the_fused_copy_has_no_separate_relu_add_or_cat_and_matches():
    import operator

    from srntt_core.models import fuse

    model = _tiny_bn_model(8)
    fused = inference_copy(model, channels_last=True)
    plain = inference_copy(model, channels_last=True, fuse=False)
    for name in ("content_extractor", "texture_transfer"):
        ops = _graph_ops(getattr(fused, name))
        assert not {operator.add, torch.cat, "ReLU", "Conv2d", "Identity"} & set(ops), (name, ops)
        assert "FusedConv" in ops
    # each cat + conv of the texture transfer is one FusedConv over two inputs
    assert fused.get_submodule("texture_transfer.small_in.0").parts == 2
    assert fused.get_submodule("texture_transfer.small_up.0").relu  # ReLU moved before the PixelShuffle
    lr = torch.rand(1, 3, 12, 16) * 2 - 1
    maps = {"relu3_1": torch.rand(1, 256, 12, 16), "relu2_1": torch.rand(1, 128, 24, 32),
            "relu1_1": torch.rand(1, 64, 48, 64)}
    maps = {k: v.contiguous(memory_format=torch.channels_last) for k, v in maps.items()}
    with torch.no_grad():
        torch.testing.assert_close(fused(lr, maps), plain(lr, maps), atol=1e-5, rtol=0)
        torch.testing.assert_close(fused(lr, maps), model(lr, maps), atol=1e-5, rtol=0)
    assert isinstance(fuse.fast_generator(model).get_submodule("texture_transfer.large_in.0"), fuse.FusedConv)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs torch's oneDNN (mkldnn)")
def test_fusion_keeps_the_order_of_relu_and_add_and_falls_back_where_it_cannot_fuse():
    from srntt_core.models import fuse

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 1)

        def forward(self, x, y):
            h = torch.relu(self.a(x)) + y  # ReLU before the add: not one post-op chain
            return torch.relu(self.b(h) + y) + self.c(x)[:, :, :1]  # not a conv's own output: not fused

    torch.manual_seed(9)
    net = Net().eval().requires_grad_(False)
    fused = fuse.fuse_convolutions(net)
    x, y = torch.randn(2, 4, 6, 7), torch.randn(2, 4, 6, 7)
    with torch.no_grad():
        want = net(x, y)
        torch.testing.assert_close(fused(x, y), want, atol=1e-5, rtol=0)
    assert fused.a.relu and not fused.a.add and fused.b.add and fused.b.relu and not fused.c.add
    # an input that needs gradients takes the plain ops (oneDNN's fused op has no backward)
    xg = x.clone().requires_grad_(True)
    out = fused(xg, y)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), want, atol=1e-5, rtol=0)
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_the_copy_is_built_on_one_thread_and_the_thread_count_restored(monkeypatch):
    from srntt_core.models import fuse

    seen = []
    real = fuse.inference_copy
    monkeypatch.setattr(fuse, "inference_copy",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    threads = torch.get_num_threads()
    fuse.fast_generator(_tiny_bn_model(10))
    assert seen == [1] and torch.get_num_threads() == threads


def test_disabling_onednn_runs_the_plain_convolutions_which_torch_counts():
    """``torch.backends.mkldnn.flags(enabled=False)`` turns the fusion off: FlopCounterMode, which
    counts only plain convolutions, then sees every one of the fast path's."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _tiny_bn_model(11)
    lr = torch.rand(1, 3, 12, 16) * 2 - 1
    maps = {"relu3_1": torch.rand(1, 256, 12, 16), "relu2_1": torch.rand(1, 128, 24, 32),
            "relu1_1": torch.rand(1, 64, 48, 64)}
    counts = {}
    for name, net in (("plain", model), ("fast", fast_generator(model))):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False), counter:
            net(lr, maps)
        counts[name] = counter.get_total_flops()
    assert counts["fast"] == counts["plain"] > 0


# ---------------------------------------------------------------------------------------------
# Winograd convolutions in the fast path; plain ops in the straightforward one

needs_winograd = pytest.mark.skipif(not winograd.available(),
                                    reason="needs the Winograd op (the extension on an AVX2 CPU)")


def _counting(monkeypatch, module, name) -> list:
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@needs_winograd
def test_the_fast_path_runs_winograd_and_the_straightforward_path_does_not(monkeypatch, zebra):
    from srntt_core.models import fuse

    convs = _counting(monkeypatch, fuse.winograd, "conv3x3")
    packs = _counting(monkeypatch, fuse.winograd, "pack")
    model = _tiny_bn_model(12)
    _, lr, ref = zebra
    slow = I.super_resolve(model, lr, [ref], fast=False, tile=None)
    assert convs == [] and packs == []
    fast = I.super_resolve(model, lr, [ref], tile=None)
    per_call = len(convs)
    # VGG (conv1_2, conv2_1, conv2_2, conv3_1 in three passes) and the generator's 3x3 convolutions
    assert per_call > 12 and len(packs) > 4
    I.super_resolve(model, lr, [ref], tile=None)
    assert len(convs) == 2 * per_call and len(packs) < per_call  # filters are packed once
    assert (fast - slow).abs().max() <= 1e-4


def test_plain_ops_run_torchs_convolution_and_relu():
    from srntt_core.models import fuse

    torch.manual_seed(13)
    conv = nn.Conv2d(16, 8, 3, padding=1).eval().requires_grad_(False)
    x = torch.randn(1, 16, 9, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fuse.plain_ops():
        got = fuse.conv2d_relu(conv, x)
        with fuse.plain_ops():
            pass
        again = fuse.conv2d_relu(conv, x)  # a nested block leaves the outer one in force
    want = torch.relu(conv(x))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(again, want, atol=0, rtol=0)


@needs_winograd
@pytest.mark.parametrize("change", ["in_place", "new_parameter"])
def test_winograd_filters_are_repacked_when_the_weight_changes(change):
    from srntt_core.models import fuse

    torch.manual_seed(14)
    conv = nn.Conv2d(8, 16, 3, padding=1).eval().requires_grad_(False)
    x = torch.randn(1, 8, 9, 11).contiguous(memory_format=torch.channels_last)

    def want():
        return torch.relu(F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)).float()

    with torch.no_grad():
        torch.testing.assert_close(fuse.conv2d_relu(conv, x), want(), atol=1e-5, rtol=0)
        if change == "in_place":
            conv.weight.mul_(-2)
        else:
            conv.weight = nn.Parameter(torch.randn_like(conv.weight) * 0.1, requires_grad=False)
        torch.testing.assert_close(fuse.conv2d_relu(conv, x), want(), atol=1e-5, rtol=0)
