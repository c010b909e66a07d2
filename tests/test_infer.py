"""Inference: any size, several references, tiling with overlap blending, checkpoint errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srntt_core import swap
from srntt_core.models import infer as I
from srntt_core.models.checkpoint import export_model
from srntt_core.models.srntt import SRNTT

TINY = dict(ch=8, content_blocks=1, transfer_blocks=(1, 1, 1))


def _smooth(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, max(h // 4, 2), max(w // 4, 2), generator=g), size=(h, w),
                         mode="bilinear", align_corners=False)[0]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return SRNTT(**TINY).eval()


class Nearest(nn.Module):
    """A pointwise stand-in network: tiles blended together must equal the whole image exactly."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, lr, maps):
        self.seen.append({k: tuple(v.shape) for k, v in maps.items()})
        return F.interpolate(lr, scale_factor=4, mode="nearest") * self.w


@pytest.mark.parametrize("h,w", [(7, 9), (13, 4), (16, 16)])
def test_any_size_and_aspect(tiny_model, h, w):
    lr = _smooth(h, w)
    sr = I.super_resolve(tiny_model, lr, [_smooth(37, 50, 1)], tile=None)
    assert sr.shape == (3, 4 * h, 4 * w) and 0 <= sr.min() and sr.max() <= 1


def test_several_references_and_odd_reference_sizes(tiny_model):
    lr = _smooth(10, 12)
    refs = [_smooth(30, 41, 1), _smooth(9, 50, 2), _smooth(64, 64, 3)]
    sr = I.super_resolve(tiny_model, lr, refs, tile=None)
    assert sr.shape == (3, 40, 48)
    with pytest.raises(ValueError, match="at least one reference"):
        I.super_resolve(tiny_model, lr, [])


def test_reference_bank_equals_texture_swap():
    lr, ref = _smooth(12, 16)[None], I.prepare_reference(_smooth(40, 52, 4))
    want = swap.texture_swap(lr, ref)
    got = I.ReferenceBank([ref]).swap(lr)
    for k in want.maps:
        torch.testing.assert_close(got[k], want.maps[k])


def test_tiling_blends_to_the_untiled_result():
    net = Nearest()
    lr = _smooth(37, 29)
    whole = I.super_resolve(net, lr, [_smooth(32, 32, 1)], tile=None)
    net.seen.clear()
    calls = []
    tiled = I.super_resolve(net, lr, [_smooth(32, 32, 1)], tile=16, overlap=4,
                            progress=lambda d, t: calls.append((d, t)))
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)
    # bounded work per call: every tile is at most 16x16 LR pixels
    assert all(s["relu3_1"][-2] <= 16 and s["relu3_1"][-1] <= 16 for s in net.seen)
    assert len(calls) == len(net.seen) > 4 and calls[-1][0] == calls[-1][1]
    with pytest.raises(ValueError, match="overlap"):
        I.super_resolve(net, lr, [_smooth(32, 32)], tile=16, overlap=8)


def test_tiled_real_network_close_to_untiled(tiny_model):
    lr = _smooth(30, 26)
    ref = [_smooth(48, 48, 2)]
    whole = I.super_resolve(tiny_model, lr, ref, tile=None)
    tiled = I.super_resolve(tiny_model, lr, ref, tile=20, overlap=6)
    assert (tiled - whole).abs().mean() < 0.02


def test_checkpoint_roundtrip_and_errors(tmp_path, tiny_model):
    path = export_model(tiny_model, tmp_path / "m.pt", fp16=True)
    m = I.load_model(path)
    assert m.config == tiny_model.config and not m.training
    assert all(p.dtype == torch.float32 for p in m.parameters())
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        I.load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(I.CheckpointError, match="cannot read checkpoint"):
        I.load_model(tmp_path / "junk.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["ch"] = 16
    torch.save(ckpt, tmp_path / "wrong.pt")
    with pytest.raises(I.CheckpointError, match="does not fit SRNTT.*shape mismatch"):
        I.load_model(tmp_path / "wrong.pt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state_dict"]["texture_transfer.out.1.weight"]
    torch.save(ckpt, tmp_path / "missing_key.pt")
    with pytest.raises(I.CheckpointError, match="missing key"):
        I.load_model(tmp_path / "missing_key.pt")
    torch.save({"foo": 1}, tmp_path / "other.pt")
    with pytest.raises(I.CheckpointError, match="not an SRNTT checkpoint"):
        I.load_model(tmp_path / "other.pt")


@pytest.mark.skipif(not I.BUNDLED_CHECKPOINT.is_file(), reason="bundled checkpoint not built yet")
def test_bundled_checkpoint_loads():
    m = I.load_model("bundled")
    assert I.BUNDLED_CHECKPOINT.stat().st_size <= 10 * 2 ** 20
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(4.38e6, rel=0.005)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_matches_cpu(tiny_model):
    lr, ref = _smooth(12, 10), [_smooth(32, 32, 1)]
    cpu = I.super_resolve(tiny_model, lr, ref, tile=None)
    gpu = I.super_resolve(tiny_model.cuda(), lr, ref, tile=None)
    tiny_model.cpu()
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=0)


def test_loading_builds_the_network_once_and_keeps_it_trainable(tmp_path, monkeypatch):
    """The checked shape-only skeleton becomes the network (no second, randomly initialized build)."""
    torch.manual_seed(3)
    source = SRNTT(**TINY)
    path = export_model(source, tmp_path / "g.pt", fp16=False)
    built = []
    real_init = SRNTT.__init__
    monkeypatch.setattr(SRNTT, "__init__", lambda self, *a, **k: built.append(1) or real_init(self, *a, **k))
    model = I.load_model(path)
    assert len(built) == 1
    assert not any(t.is_meta for t in model.state_dict().values())
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert model.state_dict().keys() == source.state_dict().keys()
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
        assert model.state_dict()[k].data_ptr() != v.data_ptr()
