"""Training loop: online swapping, interruption + resume, atomic checkpoints, logs, export."""

import csv
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from srntt_core.models import checkpoint as C
from srntt_core.models import data as D
from srntt_core.models import train as T
from srntt_core.models.srntt import SRNTT

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
    return C.safe_load(os.path.join(out, "last.pt"))


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
    assert not list(resumed.glob("*.tmp*"))  # the partial file of the crashed save is cleaned up


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
    p = C.atomic_save({"a": torch.ones(2)}, tmp_path / "x" / "c.pt")
    assert torch.equal(torch.load(p, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path / "x") == ["c.pt"]


def test_warmup_is_defined_on_steps():
    cfg = T.TrainConfig(data=[], out="", steps=100, lr=1e-3, lr_schedule="cosine", lr_floor=0.1,
                        warmup_steps=10)
    assert T._lr_at(cfg, 0, 0) == pytest.approx(1e-4)
    assert T._lr_at(cfg, 4, 0) == pytest.approx(5e-4, rel=1e-2)
    assert T._lr_at(cfg, 9, 0) == pytest.approx(T._scheduled_lr(cfg, 9, 0))
    assert T._lr_at(cfg, 100, 0) == pytest.approx(1e-4)


def _tiny_export(path, seed=0, **model):
    torch.manual_seed(seed)
    net = SRNTT(residual="bicubic", **{**TINY, **model})
    return C.export_model(net, path, fp16=False), net


def test_init_starts_a_new_run_from_given_weights(folder, tmp_path):
    path, net = _tiny_export(tmp_path / "init.pt", seed=11)
    out = tmp_path / "run"
    # lr 0: the weights stay those of the init checkpoint (the BN statistics move with the batches)
    T.train(_cfg(folder, out, steps=1, lr=0.0, init=str(path)))
    trained = _state(out)["model"]
    for k, v in net.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(trained[k], v, rtol=0, atol=0, msg=k)
    # a resume continues from last.pt, not from init
    T.train(_cfg(folder, out, steps=2, lr=1e-2, init=str(path)))
    resumed = _state(out)["model"]
    last = "texture_transfer.out.1.weight"
    assert not torch.equal(resumed[last], net.state_dict()[last])
    other = T.train(_cfg(folder, tmp_path / "fresh", steps=1, lr=0.0))
    assert other["step"] == 1
    fresh = _state(tmp_path / "fresh")["model"]
    first = "content_extractor.head.0.weight"
    assert not torch.equal(fresh[first], net.state_dict()[first])


def test_init_must_fit_the_network(folder, tmp_path):
    path, _ = _tiny_export(tmp_path / "wide.pt", ch=16)
    with pytest.raises(ValueError, match="init: .* is a network with"):
        T.train(_cfg(folder, tmp_path / "run", steps=1, init=str(path)))
    with pytest.raises(FileNotFoundError, match="init: checkpoint not found"):
        T.train(_cfg(folder, tmp_path / "run2", steps=1, init=str(tmp_path / "missing.pt")))
    assert not (tmp_path / "run2").exists()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(C.CheckpointError):
        T.train(_cfg(folder, tmp_path / "run3", steps=1, init=str(bad)))


def test_log_of_a_run_killed_before_its_first_checkpoint_starts_over(folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "loss.csv", "w") as f:  # a killed run logged steps 1-2 but never saved last.pt
        f.write(",".join(T.LOG_FIELDS) + "\n1,1.0,0.001,9,9,,,,,,\n2,2.0,0.001,9,9,,,,,,\n")
    T.train(_cfg(folder, out, steps=1))
    with open(out / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1] and rows[0]["loss"] != "9"


def test_log_rewrite_is_atomic(tmp_path, monkeypatch):
    log = tmp_path / "loss.csv"
    text = ",".join(T.LOG_FIELDS) + "\n1,1.0,0.001,9,9,,,,,,\n2,2.0,0.001,8,8,,,,,,\nbroken line\n"
    log.write_text(text)

    def killed(self, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        T._truncate_log(log, 1)
    assert log.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["loss.csv"]
    monkeypatch.undo()
    T._truncate_log(log, 1)
    with open(log) as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1"]


def test_resume_checks_the_optimizer_state(folder, tmp_path):
    out = tmp_path / "run"
    T.train(_cfg(folder, out, steps=1))
    state = _state(out)
    state["opt"]["state"][0]["exp_avg"] = torch.zeros(3)
    torch.save(state, out / "last.pt")
    with pytest.raises(C.CheckpointError, match="generator optimizer state 0.exp_avg has shape"):
        T.train(_cfg(folder, out, steps=2))
    state["step"] = "1"
    torch.save(state, out / "last.pt")
    with pytest.raises(C.CheckpointError, match="step is '1'"):
        T.train(_cfg(folder, out, steps=2))


@pytest.mark.parametrize("field,value", [("batch", 0), ("save_every", 0), ("steps", -1), ("truth_every", 0),
                                         ("crop", 8), ("lr", float("nan")), ("model", {"ch": 10**5}),
                                         ("batch_norm", "group"), ("dist_timeout", 0), ("warmup_steps", -1),
                                         ("pair_mix", "overlap:1,bogus:1"), ("init", "")])
def test_bad_settings_refused_before_work(folder, tmp_path, field, value):
    with pytest.raises(ValueError, match=field if field != "model" else "ch"):
        T.train(_cfg(folder, tmp_path / "run", **{field: value}))
    assert not (tmp_path / "run").exists()


def test_unusable_training_images_are_named(tmp_path, capsys):
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    Image.new("RGB", (2, 2)).save(tiny / "two.png")
    with pytest.raises(ValueError, match="no usable training images.*two.png.*smaller"):
        D.TrainCrops([tiny], crop=16, ref_crop=16)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (64, 32), "gray").save(mixed / "good.png")
    (mixed / "broken.jpg").write_bytes(b"not a jpeg")
    crops = D.TrainCrops([mixed], crop=16, ref_crop=16)
    assert len(crops) == 2 and crops.skipped and "broken.jpg" in capsys.readouterr().err


def test_resume_restores_the_rng(folder, tmp_path):
    # the critic's gradient penalty draws from the global generator: a resume must continue its stream
    out = tmp_path / "run"
    T.train(_cfg(folder, out, steps=1))
    saved = _state(out)["rng"]
    torch.manual_seed(12345)  # whatever ran in between must not matter
    T.train(_cfg(folder, out, steps=1))  # resumes at step 1: nothing to train
    assert torch.equal(torch.get_rng_state(), saved)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_step_on_gpu(folder, tmp_path):
    summary = T.train(_cfg(folder, tmp_path / "gpu", steps=2, device="cuda", amp=True, train_with_truth=True))
    assert summary["step"] == 2
    state = _state(tmp_path / "gpu")
    assert state["scaler"] is not None
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_frozen_batch_norm_keeps_the_running_statistics(folder, tmp_path):
    with pytest.raises(ValueError, match="bn_recalibrate"):
        T.train(_cfg(folder, tmp_path / "bad", batch_norm="frozen", bn_recalibrate=2))
    T.train(_cfg(folder, tmp_path / "run", steps=2, batch_norm="frozen"))
    model = _state(tmp_path / "run")["model"]
    means = [v for k, v in model.items() if k.endswith("running_mean")]
    assert means and all(torch.count_nonzero(m) == 0 for m in means)
    assert any(not torch.all(v == 1) for k, v in model.items() if k.endswith(".weight") and v.dim() == 1)


def test_tensorboard_log_when_installed(folder, tmp_path):
    pytest.importorskip("tensorboard")
    T.train(_cfg(folder, tmp_path / "run", steps=2, save_every=1))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"loss/rec", "lr", "steps_per_s"} <= set(events.Tags()["scalars"])
    assert len(events.Images("val/bicubic|sr|hr")) == 2  # at both saves
    T.train(_cfg(folder, tmp_path / "off", steps=1, tensorboard=False))
    assert not (tmp_path / "off" / "tensorboard").exists()


def test_loss_chart_with_and_without_matplotlib(tmp_path, monkeypatch):
    log = tmp_path / "loss.csv"
    log.write_text(",".join(T.LOG_FIELDS) + "\n1,1.0,0.001,0.5,0.5,,,,,,\n2,2.0,0.001,0.25,0.25,,,,,,\n")
    png = T.plot_log(log, tmp_path / "loss.png")
    assert Image.open(png).format == "PNG"
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.warns(RuntimeWarning, match="matplotlib is not installed: no loss chart"):
        assert T.plot_log(log, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_train_flags_set_the_config_fields_of_their_names():
    import argparse
    import dataclasses

    from srntt_core import cli
    from srntt_core.cli import commands

    argv = ["train", "d1", "d2", "--out", "o", "--steps", "7", "--batch", "3", "--crop", "32",
            "--ref-crop", "40", "--lr", "0.002", "--lr-schedule", "cosine", "--lr-floor", "0.2",
            "--warmup-steps", "5",
            "--losses", "full", "--pretrain-steps", "2", "--texture-weighting", "paper", "--train-with-truth",
            "--truth-every", "3", "--residual", "bicubic", "--augment", "--pair-mix", "overlap:1",
            "--init", "bundled", "--seed", "9", "--device", "cpu", "--no-amp", "--backend", "torch",
            "--save-every", "4", "--time-budget", "60", "--stop-at", "12:00", "--threads", "2",
            "--bn-recalibrate", "3", "--export", "e.pt", "--batch-norm", "frozen", "--dist-timeout", "99",
            "--no-tensorboard"]
    args = cli.build_parser().parse_args(argv)
    expected = T.TrainConfig(
        data=["d1", "d2"], out="o", steps=7, batch=3, crop=32, ref_crop=40, lr=0.002, lr_schedule="cosine",
        lr_floor=0.2, warmup_steps=5, losses="full", pretrain_steps=2, texture_weighting="paper",
        train_with_truth=True, truth_every=3, residual="bicubic", augment=True, pair_mix="overlap:1",
        init="bundled", seed=9, device="cpu", amp=False, backend="torch", save_every=4, time_budget=60.0,
        stop_at="12:00", num_threads=2, bn_recalibrate=3, export="e.pt", batch_norm="frozen",
        dist_timeout=99.0, tensorboard=False)
    assert commands.train_config(args) == expected
    # every field is a flag, but for the ones only the Python API sets
    default = T.TrainConfig(data=["d1", "d2"], out="o")
    same = {f.name for f in dataclasses.fields(T.TrainConfig)
            if getattr(expected, f.name) == getattr(default, f.name)}
    assert same == {"data", "out", "weights", "perceptual_layer", "perceptual_weights", "model", "progress"}
    plain = cli.build_parser().parse_args(["train", "d1", "d2", "--out", "o"])
    assert commands.train_config(plain) == default
    with pytest.raises(TypeError, match="'bogus' has no TrainConfig field"):
        commands.train_config(argparse.Namespace(**vars(args), bogus=1))
