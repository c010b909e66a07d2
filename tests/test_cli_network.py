"""The network subcommands of the CLI: sr, demo, eval, train (through ``srntt_core.cli.main``)."""

import numpy as np
import pytest
import torch
from PIL import Image

from srntt_core import cli
from srntt_core.checkpoint import export_model
from srntt_core.infer import BUNDLED_CHECKPOINT
from srntt_core.models.srntt import SRNTT


def _img(path, h, w, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 6, 2), max(w // 6, 2), 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.BICUBIC).save(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = SRNTT(ch=8, content_blocks=1, transfer_blocks=(1, 1, 1), residual="bicubic")
    return str(export_model(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt"))


def test_sr_several_refs_any_size(tmp_path, tiny_ckpt, capsys):
    lr = _img(tmp_path / "lr.png", 11, 17)
    refs = [_img(tmp_path / "r1.png", 30, 45, 1), _img(tmp_path / "r2.jpg", 50, 21, 2)]
    out = tmp_path / "out" / "sr.png"
    rc = cli.main(["sr", lr, "--ref", refs[0], "--ref", refs[1], "-o", str(out), "--checkpoint", tiny_ckpt,
                   "--device", "cpu", "--tile", "12", "--overlap", "2"])
    assert rc == 0
    assert Image.open(out).size == (68, 44)
    assert "2 reference(s)" in capsys.readouterr().out
    rc = cli.main(["sr", lr, "-o", str(tmp_path / "noref.png"), "--checkpoint", tiny_ckpt])
    assert rc == 0 and "no-reference mode" in capsys.readouterr().err


def test_sr_clear_errors(tmp_path, tiny_ckpt, capsys):
    lr = _img(tmp_path / "lr.png", 12, 12)
    missing = str(tmp_path / "nope.png")
    rc = cli.main(["sr", missing, "-o", str(tmp_path / "o.png"), "--checkpoint", tiny_ckpt])
    assert rc == 2 and "image not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    rc = cli.main(["sr", lr, "--ref", str(bad), "-o", str(tmp_path / "o.png"), "--checkpoint", tiny_ckpt])
    assert rc == 2 and "cannot read image" in capsys.readouterr().err
    wrong = torch.load(tiny_ckpt, weights_only=True)
    wrong["config"]["content_blocks"] = 2
    torch.save(wrong, tmp_path / "wrong.pt")
    rc = cli.main(["sr", lr, "-o", str(tmp_path / "o.png"), "--checkpoint", str(tmp_path / "wrong.pt")])
    assert rc == 2 and "does not fit" in capsys.readouterr().err


def test_eval_table(tmp_path, tiny_ckpt, capsys):
    data = tmp_path / "set"
    data.mkdir()
    _img(data / "a.png", 48, 96)
    _img(data / "b.png", 100, 60, 1)
    rc = cli.main(["eval", str(data), "--checkpoint", tiny_ckpt, "--csv", str(tmp_path / "r.csv")])
    out = capsys.readouterr().out
    assert rc == 0
    for label in ("Bicubic", "real reference", "no reference", "oracle"):
        assert label in out
    assert (tmp_path / "r.csv").read_text().count("\n") == 3
    rc = cli.main(["eval", str(tmp_path / "missing"), "--checkpoint", tiny_ckpt])
    assert rc == 2


def test_demo_with_given_checkpoint(tmp_path, tiny_ckpt, capsys):
    image = _img(tmp_path / "sample.png", 64, 120)
    rc = cli.main(["demo", "-o", str(tmp_path / "demo"), "--checkpoint", tiny_ckpt, "--image", image])
    out = capsys.readouterr().out
    assert rc == 0 and "PSNR-Y" in out and "time:" in out
    for name in ("srntt", "bicubic", "hr", "reference", "lr", "comparison"):
        assert (tmp_path / "demo" / f"{name}.png").is_file()
    w, h = Image.open(tmp_path / "demo" / "comparison.png").size
    assert w >= 3 * 60 and h > 64


@pytest.mark.skipif(not BUNDLED_CHECKPOINT.is_file(), reason="bundled checkpoint not built yet")
def test_demo_bundled(tmp_path, capsys):
    rc = cli.main(["demo", "-o", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert rc == 0 and "srntt" in out
    rows = [line.split() for line in out.splitlines()]
    psnr = {r[0]: float(r[1]) for r in rows if len(r) == 3 and r[0] in ("bicubic", "srntt")}
    assert psnr["srntt"] > psnr["bicubic"]


def test_train_command_and_resume(tmp_path, capsys):
    data = tmp_path / "hr"
    data.mkdir()
    _img(data / "a.png", 40, 64)
    args = ["train", str(data), "--out", str(tmp_path / "run"), "--steps", "1", "--batch", "1",
            "--crop", "16", "--ref-crop", "16", "--residual", "bicubic", "--threads", "1",
            "--export", str(tmp_path / "m.pt")]
    assert cli.main(args) == 0
    assert (tmp_path / "run" / "last.pt").is_file() and (tmp_path / "m.pt").is_file()
    assert cli.main(args) == 0  # already done: resumes at step 1, nothing to train
    assert "nothing to train" in capsys.readouterr().err
