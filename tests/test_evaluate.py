"""The evaluation table's reference-effect columns and the reference ablation row."""

import csv

import pytest
import torch

from srntt_core.models import evaluate as E
from srntt_core.models.data import Pair
from srntt_core.models.srntt import SRNTT


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # residual=None: the output depends on the maps from the first step (no zero-initialized tail)
    return SRNTT(ch=8, content_blocks=1, transfer_blocks=(1, 1, 1)).eval()


@pytest.fixture(scope="module")
def pairs():
    g = torch.Generator().manual_seed(1)
    smooth = [torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(48, 64),
                                              mode="bicubic", align_corners=False).clamp(0, 1)[0]
              for _ in range(4)]
    return [Pair("a", smooth[0], [smooth[1]]), Pair("b", smooth[2], [smooth[3]])]


def test_zero_maps_feeds_zeros(model):
    seen = []
    handle = model.texture_transfer.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    try:
        x = torch.rand(1, 3, 8, 8) * 2 - 1
        maps = {"relu3_1": torch.rand(1, 256, 8, 8), "relu2_1": torch.rand(1, 128, 16, 16),
                "relu1_1": torch.rand(1, 64, 32, 32)}
        with torch.no_grad():
            ablated = E.ZeroMaps(model)(x, maps)
            plain = model(x, maps)
            zero = model(x, {k: torch.zeros_like(v) for k, v in maps.items()})
    finally:
        handle.remove()
    assert all(float(v.abs().max()) == 0 for v in seen[0].values())
    assert torch.equal(ablated, zero) and not torch.equal(ablated, plain)


def test_effects_per_image_mean_table_and_csv(model, pairs, tmp_path):
    result = E.evaluate_pairs(model, pairs, tile=None, verbose=False)
    assert result.rows() == list(E.ROWS)
    assert result.effects() == list(E.EFFECTS)
    for rec in result.per_image:
        assert rec["ref_minus_noref"] == pytest.approx(rec["srntt_ref_psnr"] - rec["srntt_noref_psnr"])
        assert rec["oracle_minus_ref"] == pytest.approx(rec["srntt_oracle_psnr"] - rec["srntt_ref_psnr"])
        assert rec["ref_minus_ablation"] == pytest.approx(rec["srntt_ref_psnr"] - rec["srntt_ablation_psnr"])
        assert rec["srntt_ablation_psnr"] != rec["srntt_noref_psnr"]
    mean = sum(r["ref_minus_noref"] for r in result.per_image) / 2
    assert result.mean_effect("ref_minus_noref") == pytest.approx(mean)
    table = result.table()
    assert "reference ablation (swapped maps zeroed)" in table
    assert "| real − none | oracle − real | real − ablation |" in table
    assert f"**{mean:+.3f}**" in table
    assert "| a | " in table and "| b | " in table
    with open(result.write_csv(tmp_path / "r.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[0]["ref_minus_noref"]) == pytest.approx(
        result.per_image[0]["ref_minus_noref"], abs=1e-4)
    assert "srntt_ablation_psnr" in rows[0] and "oracle_minus_ref" in rows[0]


def test_effects_only_for_rows_given(model, pairs):
    result = E.evaluate_pairs(model, pairs, rows=["bicubic", "srntt_ref", "srntt_oracle"], tile=None,
                              verbose=False)
    assert result.effects() == ["oracle_minus_ref"]
    assert "real − none" not in result.table() and "oracle − real" in result.table()
    bare = E.evaluate_pairs(model, pairs, rows=["bicubic"], tile=None, verbose=False)
    assert bare.effects() == [] and "Reference effect" not in bare.table()


def test_ablation_row_runs_the_zeroed_network(model, pairs, monkeypatch):
    seen = []
    real = E.super_resolve

    def spy(net, lr, refs, **kwargs):
        seen.append(type(net).__name__)
        return real(net, lr, refs, **kwargs)

    monkeypatch.setattr(E, "super_resolve", spy)
    E.evaluate_pairs(model, pairs[:1], rows=["srntt_noref", "srntt_ablation"], tile=None, verbose=False)
    assert seen == ["SRNTT", "ZeroMaps"]
