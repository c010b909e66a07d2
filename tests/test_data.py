"""Image IO, mod-crop, PIL bicubic, split-image / CUFED5 pairs, training crops."""


import numpy as np
import pytest
import torch
from conftest import TEST_IMAGES
from PIL import Image

from srntt_core.models import data as D


def _write(path, h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def test_load_save_roundtrip_and_modes(tmp_path):
    p = _write(tmp_path / "a.png", 9, 13)
    x = D.load_image(p)
    assert x.shape == (3, 9, 13) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    D.save_image(x, tmp_path / "sub" / "b.png")
    torch.testing.assert_close(D.load_image(tmp_path / "sub" / "b.png"), x)
    g = D.load_image(_write(tmp_path / "g.png", 5, 6, mode="L"))
    assert g.shape == (3, 5, 6) and torch.equal(g[0], g[1])
    Image.new("RGBA", (4, 3), (10, 20, 30, 40)).save(tmp_path / "rgba.png")
    assert D.load_image(tmp_path / "rgba.png").shape == (3, 3, 4)


def test_sixteen_bit_png_is_scaled_not_white(tmp_path):
    grey = np.array([[0, 30000, 65535]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = D.load_image(tmp_path / "g16.png")
    torch.testing.assert_close(x, torch.tensor(grey / 65535, dtype=torch.float32).expand(3, 1, 3))


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((4, 6, 3), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0)  # top-left red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image is to be rotated 90 degrees clockwise for display
    Image.fromarray(arr).save(tmp_path / "r.png", exif=exif)
    x = D.load_image(tmp_path / "r.png")
    assert x.shape == (3, 6, 4) and D.image_size(tmp_path / "r.png") == (4, 6)
    assert x[0, 0, -1] == 1 and x[0, 0, 0] == 0  # the top-left pixel is now top-right


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = D.load_image(tmp_path / "a.png")
    want = torch.tensor([[1, 1, 1], [10 / 255, 20 / 255, 30 / 255], [127 / 255] * 3]).T[:, None, :]
    torch.testing.assert_close(x, want.float(), atol=1e-6, rtol=0)
    Image.fromarray(np.zeros((1, 2), np.uint8), "L").save(tmp_path / "la.png", transparency=0)
    assert torch.equal(D.load_image(tmp_path / "la.png"), torch.ones(3, 1, 2))


def test_clear_errors_for_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found"):
        D.load_image(tmp_path / "missing.png")
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(D.ImageReadError, match="cannot read image .*corrupt.png"):
        D.load_image(bad)
    truncated = tmp_path / "trunc.png"
    full = _write(tmp_path / "full.png", 64, 64).read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(D.ImageReadError):
        D.load_image(truncated)
    with pytest.raises(IsADirectoryError):
        D.load_image(tmp_path)
    with pytest.raises(FileNotFoundError, match="image folder"):
        D.list_images(tmp_path / "nope")


def test_mod_crop_and_bicubic_match_pil(tmp_path):
    x = D.load_image(_write(tmp_path / "a.png", 23, 30))
    y = D.mod_crop(x)
    assert y.shape == (3, 20, 28)
    torch.testing.assert_close(y, x[:, :20, :28])
    lr = D.bicubic_down(y)
    want = np.asarray(Image.open(tmp_path / "a.png").crop((0, 0, 28, 20)).resize((7, 5), Image.BICUBIC))
    torch.testing.assert_close(lr, torch.from_numpy(want.copy()).permute(2, 0, 1).float() / 255)
    assert D.bicubic_up(lr).shape == (3, 20, 28)
    with pytest.raises(ValueError, match="multiple of 4"):
        D.bicubic_down(x)
    with pytest.raises(ValueError, match="smaller"):
        D.mod_crop(x[:, :3])
    assert D.bicubic_down(y[None]).shape == (1, 3, 5, 7)


@pytest.mark.parametrize("h,w,target,ref", [(40, 66, (40, 32), (40, 32)), (70, 30, (32, 28), (32, 28)),
                                            (41, 41, (40, 20), (40, 20))])
def test_split_image(h, w, target, ref):
    x = torch.rand(3, h, w)
    a, b = D.split_image(x)
    assert a.shape[-2:] == target and b.shape[-2:] == ref
    if w >= h:
        torch.testing.assert_close(b, x[:, : ref[0], w // 2: w // 2 + ref[1]])


def test_pairs_split_and_cufed5(tmp_path):
    split = tmp_path / "split"
    split.mkdir()
    _write(split / "x.png", 32, 64)
    _write(split / "y.jpg", 48, 40, seed=1)
    (split / "notes.txt").write_text("ignored")
    pairs = D.load_pairs(split)
    assert [p.name for p in pairs] == ["x", "y"] and len(pairs[0].refs) == 1
    assert pairs[0].hr.shape == (3, 32, 32)
    cu = tmp_path / "cufed"
    cu.mkdir()
    for i in range(3):
        _write(cu / f"000_{i}.png", 30, 34, seed=i)
    _write(cu / "001_0.png", 20, 20)
    _write(cu / "001_1.png", 20, 20)
    assert D.is_cufed5_folder(cu)
    pairs = D.load_pairs(cu)
    assert [(p.name, len(p.refs)) for p in pairs] == [("000", 2), ("001", 1)]
    assert pairs[0].hr.shape == (3, 28, 32)
    assert len(D.load_pairs(cu, ref_levels=[2])[0].refs) == 1
    with pytest.raises(ValueError, match="layout"):
        D.load_pairs(cu, layout="other")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        D.load_pairs(empty)


def test_train_crops_deterministic(tmp_path):
    _write(tmp_path / "a.png", 40, 80)
    _write(tmp_path / "b.png", 90, 50, seed=2)
    crops = D.TrainCrops([tmp_path], crop=16, ref_crop=24, augment=True)
    assert len(crops) == 4  # both halves of each image serve as target
    lr, hr, ref = crops.sample(3, torch.Generator().manual_seed(5))
    assert lr.shape == (3, 3, 4, 4) and hr.shape == (3, 3, 16, 16) and ref.shape == (3, 3, 24, 24)
    torch.testing.assert_close(lr, D.bicubic_down(hr))
    again = crops.sample(3, torch.Generator().manual_seed(5))
    for u, v in zip((lr, hr, ref), again, strict=True):
        assert torch.equal(u, v)
    with pytest.raises(ValueError, match="multiples of 4"):
        D.TrainCrops([tmp_path], crop=18)


def test_real_image_pairs():
    # The shipped crops include a greyscale one and sizes that are not multiples of 4.
    pairs = D.load_pairs(TEST_IMAGES)
    names = sorted(p.name for p in TEST_IMAGES.iterdir() if p.suffix == ".png")
    assert len(pairs) == len(D.list_images(TEST_IMAGES)) == len(names) >= 5
    for p in pairs:
        assert p.hr.shape[-2] % 4 == 0 and p.hr.shape[-1] % 4 == 0 and p.hr.shape[0] == 3
