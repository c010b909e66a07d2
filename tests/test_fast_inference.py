"""The fast inference path: BatchNorm folding, shared reference features, exactness against the
straightforward path (same weights, BN unfolded, nothing cached), lazy imports."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srntt_core.cli import SAMPLE_IMAGE
from srntt_core.models import infer as I
from srntt_core.models.fuse import fold_batchnorm, has_batchnorm, inference_copy
from srntt_core.models.metrics import psnr_y
from srntt_core.models.srntt import SRNTT

ZEBRA = SAMPLE_IMAGE
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
    conv = fast.texture_transfer.large_in[0]
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
