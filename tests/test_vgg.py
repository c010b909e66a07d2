"""VGG19 feature extractor: the bundled conv1_1..conv3_1 weights (sha256), layer shapes, refusals."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from srntt_core.models import vgg as vgg_module
from srntt_core.models.vgg import (
    BUNDLED_SHA256,
    BUNDLED_WEIGHTS,
    VGG19Features,
    load_bundled_state,
    sha256_of,
)

SHAPES = {"relu1_1": (64, 1), "relu2_1": (128, 2), "relu3_1": (256, 4), "relu4_1": (512, 8),
          "relu5_1": (512, 16)}


def test_bundled_weights_sha256():
    assert BUNDLED_WEIGHTS.is_file()
    assert sha256_of(BUNDLED_WEIGHTS) == BUNDLED_SHA256


def test_bundled_state_has_torchvision_keys_and_shapes():
    state = load_bundled_state()
    want = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128)}
    assert set(state) == {f"{i}.{p}" for i in want for p in ("weight", "bias")}
    for i, (out_ch, in_ch) in want.items():
        assert state[f"{i}.weight"].shape == (out_ch, in_ch, 3, 3)
        assert state[f"{i}.bias"].shape == (out_ch,)
        assert state[f"{i}.weight"].dtype == torch.float32


@pytest.mark.parametrize("size", [(64, 96), (30, 45)])
def test_layer_shapes(vgg, size):
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        out = vgg(x)
    assert set(out) == {"relu1_1", "relu2_1", "relu3_1"}
    for layer, t in out.items():
        channels, down = SHAPES[layer]
        assert t.shape == (2, channels, size[0] // down, size[1] // down), layer
        assert (t >= 0).all()


def test_stack_stops_at_the_deepest_layer():
    assert len(VGG19Features(("relu1_1",), weights=None).features) == 2
    assert len(VGG19Features(("relu2_1", "relu1_1"), weights=None).features) == 7
    assert len(VGG19Features("relu3_1").features) == 12


@pytest.mark.parametrize("layers", [("relu1_1",), ("relu1_1", "relu2_1")])
def test_bundled_weights_for_shallower_layers(layers):
    """A stack that stops before conv3_1 loads the bundled weights it needs (and only those)."""
    net = VGG19Features(layers)
    state = load_bundled_state()
    for k, v in net.features.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_first_layer_is_the_bundled_conv_on_normalized_input(vgg):
    """relu1_1 = relu(conv1_1(ImageNet-normalized x)), even though deeper in-place ReLUs ran after it."""
    state = load_bundled_state()
    x = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    want = torch.relu(F.conv2d((x - mean) / std, state["0.weight"], state["0.bias"], padding=1))
    with torch.no_grad():
        out = vgg(x)
    torch.testing.assert_close(out["relu1_1"], want, atol=1e-5, rtol=1e-5)


def test_input_range():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = VGG19Features(("relu3_1",))(x)["relu3_1"]
        b = VGG19Features(("relu3_1",), input_range=(0, 255))(x * 255)["relu3_1"]
        c = VGG19Features(("relu3_1",), input_range=(-1, 1))(x * 2 - 1)["relu3_1"]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


def test_frozen_by_default():
    net = VGG19Features(("relu3_1",))
    assert not net.training
    assert not any(p.requires_grad for p in net.parameters())
    trainable = VGG19Features(("relu3_1",), requires_grad=True)
    assert all(p.requires_grad for p in trainable.parameters())


def test_gradient_flows_to_the_input(vgg):
    x = torch.rand(1, 3, 12, 12, requires_grad=True)
    vgg(x)["relu3_1"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_input_is_not_modified(vgg):
    x = torch.rand(1, 3, 12, 16)
    x0 = x.clone()
    with torch.no_grad():
        vgg(x)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("layers", [("relu5_1",), ("relu1_1", "relu4_1")])
def test_bundled_weights_refuse_deep_layers(layers):
    with pytest.raises(ValueError) as info:
        VGG19Features(layers)
    message = str(info.value)
    assert "weights" in message and "relu3_1" in message
    assert layers[-1] in message
    assert "torchvision" in message or "imagenet" in message


def test_corrupt_bundled_weights_are_detected(tmp_path, monkeypatch):
    corrupt = tmp_path / BUNDLED_WEIGHTS.name
    shutil.copy(BUNDLED_WEIGHTS, corrupt)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0x01
    corrupt.write_bytes(bytes(data))
    monkeypatch.setattr(vgg_module, "BUNDLED_WEIGHTS", corrupt)
    with pytest.raises(RuntimeError, match="corrupt") as info:
        VGG19Features(("relu3_1",))
    assert BUNDLED_SHA256 in str(info.value)


def test_truncated_bundled_weights_are_detected(tmp_path, monkeypatch):
    truncated = tmp_path / BUNDLED_WEIGHTS.name
    truncated.write_bytes(BUNDLED_WEIGHTS.read_bytes()[:-100])
    monkeypatch.setattr(vgg_module, "BUNDLED_WEIGHTS", truncated)
    with pytest.raises(RuntimeError, match="corrupt"):
        load_bundled_state()


@pytest.mark.parametrize("layers", [("relu6_1",), ("conv1_1",), ()])
def test_unknown_layers(layers):
    with pytest.raises(ValueError, match="layers"):
        VGG19Features(layers, weights=None)


def test_bad_input_shape(vgg):
    with pytest.raises(ValueError, match="x"):
        vgg(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="x"):
        vgg(torch.rand(3, 16, 16))


def test_bad_input_range():
    with pytest.raises(ValueError, match="input_range"):
        VGG19Features(("relu1_1",), weights=None, input_range=(1, 0))


def _torchvision_state(tmp_path):
    """A torchvision-layout VGG19 state dict (random weights): features.N.* and classifier.*."""
    torch.manual_seed(0)
    net = VGG19Features(("relu5_1",), weights=None)
    state = {f"features.{k}": v.clone() for k, v in net.features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)
    path = tmp_path / vgg_module.TORCHVISION_FILE
    torch.save(state, path)
    return path, state


def test_torchvision_weights_from_a_path(tmp_path):
    path, state = _torchvision_state(tmp_path)
    net = VGG19Features(("relu1_1", "relu5_1"), weights=path)
    for k, v in net.features.state_dict().items():
        assert torch.equal(v, state[f"features.{k}"]), k
    with torch.no_grad():
        out = net(torch.rand(1, 3, 32, 48))
    assert out["relu5_1"].shape == (1, 512, 2, 3)


def test_torchvision_weights_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=vgg_module.TORCHVISION_FILE):
        VGG19Features(("relu5_1",), weights="imagenet")
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    path, state = _torchvision_state(hub)
    assert vgg_module.find_torchvision_weights() == path
    net = VGG19Features(("relu4_1",), weights="imagenet")
    assert torch.equal(net.features[19].weight, state["features.19.weight"])


def test_missing_weights_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights"):
        VGG19Features(("relu1_1",), weights=tmp_path / "nope.pth")
