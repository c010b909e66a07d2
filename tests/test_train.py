"""Training loop: online swapping, interruption + resume, atomic checkpoints, logs, export."""

import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from srntt_core import train as T

TINY = {"ch": 8, "content_blocks": 1, "transfer_blocks": [1, 1, 1]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("hr")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 72), (64, 48)]):
        # smooth random images (noise alone makes matching degenerate)
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(d / f"im{i}.png")
    return d


def _cfg(folder, out, **kw):
    base = dict(data=[str(folder)], out=str(out), steps=4, batch=2, crop=16, ref_crop=24, lr=1e-3,
                residual="bicubic", model=TINY, save_every=100, progress=False, seed=3)
    base.update(kw)
    return T.TrainConfig(**base)


def _state(out):
    return torch.load(os.path.join(out, "last.pt"), weights_only=False)


def test_interrupt_and_resume_equals_uninterrupted(folder, tmp_path):
    straight = tmp_path / "straight"
    T.train(_cfg(folder, straight, train_with_truth=True, truth_every=2))

    resumed = tmp_path / "resumed"

    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(_cfg(folder, resumed, train_with_truth=True, truth_every=2), on_step=interrupt)
    assert _state(resumed)["step"] == 2
    # a crash in the middle of a later save must not corrupt the checkpoint
    (resumed / "last.pt.tmp999").write_bytes(b"partial")
    summary = T.train(_cfg(folder, resumed, train_with_truth=True, truth_every=2))
    assert summary["step"] == 4
    a, b = _state(straight), _state(resumed)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)
    with open(resumed / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert rows[0]["truth_rec"] and not rows[1]["truth_rec"]
    assert (resumed / "loss.png").stat().st_size > 0
    assert sorted(p.name for p in resumed.glob("last.pt.tmp*")) == ["last.pt.tmp999"]  # no new leftovers


def test_log_rows_after_checkpoint_are_dropped_on_resume(folder, tmp_path):
    out = tmp_path / "run"
    T.train(_cfg(folder, out, steps=2, save_every=1))
    with open(out / "loss.csv", "a") as f:  # rows a killed run wrote after its last checkpoint
        f.write("3,1.0,0.001,9,9,,,,,,\n")
    T.train(_cfg(folder, out, steps=3))
    with open(out / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and rows[-1]["loss"] != "9"


def test_resume_with_other_network_is_refused(folder, tmp_path):
    out = tmp_path / "run"
    T.train(_cfg(folder, out, steps=1))
    with pytest.raises(ValueError, match="cannot resume"):
        T.train(_cfg(folder, out, steps=2, residual=None))


def test_time_budget_stops_and_exports_fp16(folder, tmp_path):
    out = tmp_path / "run"
    export = tmp_path / "model.pt"
    summary = T.train(_cfg(folder, out, steps=1000, time_budget=0.0, export=str(export), bn_recalibrate=1))
    assert summary["stop_reason"] == "time_budget" and summary["step"] <= 1
    ckpt = torch.load(export, weights_only=True)
    assert ckpt["kind"] == "srntt-generator" and ckpt["config"]["residual"] == "bicubic"
    assert all(v.dtype == torch.float16 for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_full_losses_one_step(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no relu5_1 weights: documented fallback
    with pytest.warns(RuntimeWarning, match="FALLING BACK"):
        T.train(_cfg(folder, tmp_path / "gan", steps=2, losses="full", pretrain_steps=1, crop=32, ref_crop=32,
                     batch=2))
    with open(tmp_path / "gan" / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["adv"] == "" and rows[1]["adv"] != "" and float(rows[1]["gp"]) >= 0


def test_lr_schedule_and_atomic_save(tmp_path):
    cfg = T.TrainConfig(data=[], out="", steps=100, lr=1e-3, lr_schedule="cosine", lr_floor=0.1)
    assert T._lr_at(cfg, 0, 0) == pytest.approx(1e-3)
    assert T._lr_at(cfg, 100, 0) == pytest.approx(1e-4)
    cfg.time_budget = 10.0
    assert T._lr_at(cfg, 0, 10.0) == pytest.approx(1e-4)
    p = T.atomic_save({"a": torch.ones(2)}, tmp_path / "x" / "c.pt")
    assert torch.equal(torch.load(p)["a"], torch.ones(2))
    assert os.listdir(tmp_path / "x") == ["c.pt"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_step_on_gpu(folder, tmp_path):
    summary = T.train(_cfg(folder, tmp_path / "gpu", steps=2, device="cuda", amp=True, train_with_truth=True))
    assert summary["step"] == 2
    state = _state(tmp_path / "gpu")
    assert state["scaler"] is not None
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
