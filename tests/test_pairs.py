"""Training pair modes (srntt_core.models.pairs) and their use in TrainCrops."""

import numpy as np
import pytest
import torch
from PIL import Image

from srntt_core.models import data as D
from srntt_core.models import pairs as P
from srntt_core.models import train as T

SIDE = 200  # coordinates fit in 8 bits


def _coordinate_image(blue: int) -> np.ndarray:
    """R = x, G = y (so a pixel tells where it came from), B = a constant naming the image."""
    y, x = np.mgrid[0:SIDE // 2, 0:SIDE]
    return np.stack([x, y, np.full_like(x, blue)], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def coords(tmp_path_factory):
    d = tmp_path_factory.mktemp("coords")
    Image.fromarray(_coordinate_image(0)).save(d / "a.png")
    Image.fromarray(_coordinate_image(250)).save(d / "b.png")
    return d


def _draw(crops, seeds=range(12)):
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        index = int(torch.randint(0, len(crops), (1,), generator=g))
        out.append((index, *crops.item(index, g)))
    return out


def test_parse_pair_mix_normalizes():
    mix = P.parse_pair_mix("overlap:0.5, half:0.3,unrelated:0.2")
    assert mix == pytest.approx({"overlap": 0.5, "half": 0.3, "unrelated": 0.2})
    assert P.parse_pair_mix("overlap:2") == {"overlap": 1.0, "half": 0.0, "unrelated": 0.0}


@pytest.mark.parametrize("spec, match", [
    ("bogus:1", "modes overlap, half, unrelated"),
    ("overlap", "'mode:weight'"),
    ("overlap:-1", "finite number >= 0"),
    ("overlap:nan", "finite number >= 0"),
    ("overlap:x", "not a number"),
    ("overlap:1,overlap:2", "given twice"),
    ("overlap:0,half:0", "sum to 0"),
    ("", "'mode:weight'"),
])
def test_bad_pair_mix_is_named(spec, match):
    with pytest.raises(ValueError, match=f"pair_mix: .*{match}"):
        P.parse_pair_mix(spec)


def test_bad_pair_mix_refused_before_loading(tmp_path):
    with pytest.raises(TypeError, match="pair_mix"):
        P.parse_pair_mix(0.5)
    # the folder does not exist: the mix is checked first
    with pytest.raises(ValueError, match="pair_mix"):
        D.TrainCrops([tmp_path / "missing"], crop=16, ref_crop=24, pair_mix="overlap:1,typo:1")
    with pytest.raises(ValueError, match="pair_mix"):
        T.validate_train_config(T.TrainConfig(data=[str(tmp_path)], out=str(tmp_path / "o"), pair_mix="half"))


def test_unrelated_needs_two_images(tmp_path):
    Image.fromarray(_coordinate_image(0)).save(tmp_path / "only.png")
    with pytest.raises(ValueError, match="pair_mix: 'unrelated' references need at least two"):
        D.TrainCrops([tmp_path], crop=16, ref_crop=24, pair_mix="unrelated:1")


def test_choose_mode_frequencies_and_single_mode_draws_nothing():
    mix = P.parse_pair_mix("overlap:0.5,half:0.3,unrelated:0.2")
    modes = [P.choose_mode(mix, torch.Generator().manual_seed(s)) for s in range(3000)]
    for mode, share in mix.items():
        assert modes.count(mode) / len(modes) == pytest.approx(share, abs=0.03)
    g = torch.Generator().manual_seed(7)
    before = g.get_state()
    assert P.choose_mode(P.parse_pair_mix("half:1"), g) == "half"
    assert torch.equal(g.get_state(), before)


@pytest.mark.parametrize("seed", range(16))
def test_overlap_view_geometry(seed):
    """Without jitter every view pixel names its source pixel: the view overlaps the crop, is
    centred where it says, and spans the source side it says (the zoom)."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    img = torch.from_numpy(np.stack([x, y, np.zeros_like(x)]).astype(np.uint8))
    g = torch.Generator().manual_seed(seed)
    y0, x0 = (int(v) for v in torch.randint(0, SIDE - 32, (2,), generator=g))
    box = (y0, x0, 32)
    view, (cy, cx, src) = P.overlap_view(img, box, 48, g, P.OverlapParams(jitter=0.0))
    assert view.shape == (3, 48, 48) and view.dtype == torch.uint8
    assert 48 / 1.25 - 1e-6 <= src <= 48 / 0.8 + 1e-6
    xs, ys = view[0].float(), view[1].float()
    inside = (xs >= box[1]) & (xs < box[1] + 32) & (ys >= box[0]) & (ys < box[0] + 32)
    assert inside.float().mean() > 0.04  # at least a quarter of each side overlaps
    assert abs(float(xs[23:25, 23:25].mean()) - cx) < 1.5 and abs(float(ys[23:25, 23:25].mean()) - cy) < 1.5
    # a row of the view spans src * cos(angle) source columns (angle <= 4 degrees)
    assert src * 0.95 - 2 < float(xs[24].max() - xs[24].min()) < src + 2


def test_overlap_view_is_deterministic_and_jittered():
    img = torch.from_numpy(_coordinate_image(120)).permute(2, 0, 1).contiguous()
    a, _ = P.overlap_view(img, (20, 40, 32), 48, torch.Generator().manual_seed(1))
    b, _ = P.overlap_view(img, (20, 40, 32), 48, torch.Generator().manual_seed(1))
    c, _ = P.overlap_view(img, (20, 40, 32), 48, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(1)
    flat, _ = P.overlap_view(img, (20, 40, 32), 48, g, P.OverlapParams(jitter=0))
    assert not torch.equal(a, flat)  # the photometric jitter changes the pixels ...
    assert (a.float() - flat.float()).abs().mean() < 0.2 * 255  # ... a little


@pytest.mark.parametrize("mode", P.PAIR_MODES)
def test_each_mode_shapes_and_determinism(coords, mode):
    crops = D.TrainCrops([coords], crop=32, ref_crop=48, augment=True, pair_mix=f"{mode}:1")
    first, again = _draw(crops), _draw(crops)
    for (_, *u), (_, *v) in zip(first, again, strict=True):
        lr, hr, ref = u
        assert lr.shape == (3, 8, 8) and hr.shape == (3, 32, 32) and ref.shape == (3, 48, 48)
        assert ref.dtype == torch.float32 and 0 <= ref.min() and ref.max() <= 1
        assert all(torch.equal(a, b) for a, b in zip(u, v, strict=True))
    assert len({tuple(r[3].flatten()[:50].tolist()) for r in first}) > 1


def _image_id(x: torch.Tensor) -> int:
    return int(x[2].mean() * 255 > 125)


def test_overlap_comes_from_the_target_region(coords):
    crops = D.TrainCrops([coords], crop=32, ref_crop=48, pair_mix="overlap:1")
    for index, _, hr, ref in _draw(crops, range(24)):
        assert _image_id(ref) == _image_id(hr)
        hx, hy, rx, ry = hr[0] * 255, hr[1] * 255, ref[0] * 255, ref[1] * 255
        # NB: the jitter moves coordinate values by up to ~10 %, hence the margin
        margin = 0.12 * 255
        inside = ((rx >= hx.min() - margin) & (rx <= hx.max() + margin)
                  & (ry >= hy.min() - margin) & (ry <= hy.max() + margin))
        assert inside.float().mean() > 0.1, index


def test_half_comes_from_the_other_half(coords):
    crops = D.TrainCrops([coords], crop=32, ref_crop=48, pair_mix="half:1")
    for _, _, hr, ref in _draw(crops):
        assert _image_id(ref) == _image_id(hr)
        left = hr[0].mean() * 255 < SIDE / 2
        assert bool((ref[0] * 255 >= SIDE / 2 - 1).all()) == bool(left)


def test_unrelated_comes_from_another_image(coords):
    crops = D.TrainCrops([coords], crop=32, ref_crop=48, pair_mix="unrelated:1")
    assert crops.image_of == [0, 0, 1, 1]
    for _, _, hr, ref in _draw(crops):
        assert _image_id(ref) != _image_id(hr)


def test_default_mix_is_the_own_reference(coords):
    a = D.TrainCrops([coords], crop=32, ref_crop=48, augment=True)
    b = D.TrainCrops([coords], crop=32, ref_crop=48, augment=True, pair_mix="half:1")
    for (_, *u), (_, *v) in zip(_draw(a), _draw(b), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(u, v, strict=True))


def test_mix_reaches_every_mode(coords):
    crops = D.TrainCrops([coords], crop=32, ref_crop=48, pair_mix="overlap:0.4,half:0.3,unrelated:0.3")
    other = same_half = 0
    for _, _, hr, ref in _draw(crops, range(60)):
        if _image_id(ref) != _image_id(hr):
            other += 1
        elif (hr[0].mean() * 255 < SIDE / 2) == (ref[0].mean() * 255 < SIDE / 2):
            same_half += 1
    assert 8 <= other <= 30 and same_half >= 10
