"""The network subcommands of the CLI: sr, demo, eval, train (through ``srntt_core.cli.main``), and
their hardening: no input overwritten, outputs written atomically, one-line errors before the work
starts, and the image rules (16-bit, EXIF orientation, transparency, pixel limit)."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srntt_core import cli
from srntt_core.models import data as D
from srntt_core.models import evaluate, infer
from srntt_core.models.checkpoint import export_model
from srntt_core.models.infer import BUNDLED_CHECKPOINT
from srntt_core.models.srntt import SRNTT


def _img(path, h, w, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 6, 2), max(w // 6, 2), 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.BICUBIC).save(path)
    return str(path)


def _png_header(path, w, h):
    """A PNG that declares w x h 8-bit grey pixels and holds almost none (a few hundred bytes)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
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


def test_eval_passes_tiling_on(tmp_path, tiny_ckpt, monkeypatch):
    data = tmp_path / "set"
    data.mkdir()
    _img(data / "a.png", 48, 96)
    seen = []
    real = evaluate.super_resolve

    def spy(*args, **kwargs):
        seen.append((kwargs.get("tile"), kwargs.get("overlap")))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "super_resolve", spy)
    rc = cli.main(["eval", str(data), "--checkpoint", tiny_ckpt, "--tile", "16", "--overlap", "4",
                   "--rows", "srntt_ref"])
    assert rc == 0
    assert seen and all(s == (16, 4) for s in seen), seen


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


# ---------------------------------------------------------------------------------------------
# hardening

@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the SR work starts."""
    def refuse(*a, **k):
        raise AssertionError("the SR work started before the error was found")

    monkeypatch.setattr(infer, "super_resolve", refuse)
    monkeypatch.setattr(evaluate, "super_resolve", refuse)


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# outputs

def test_sr_refuses_to_overwrite_its_input(tmp_path, tiny_ckpt, capsys):
    lr, ref = _img(tmp_path / "same.png", 12, 12), _img(tmp_path / "ref.png", 24, 24, 1)
    before = (tmp_path / "same.png").read_bytes()
    for out in (lr, ref):
        assert cli.main(["sr", lr, "--ref", ref, "-o", out, "--checkpoint", tiny_ckpt]) == 2
        _one_line_error(capsys, "also an input", "--overwrite")
    assert (tmp_path / "same.png").read_bytes() == before
    other = _img(tmp_path / "other.png", 5, 5)
    assert cli.main(["sr", lr, "--ref", ref, "-o", other, "--checkpoint", tiny_ckpt]) == 2
    _one_line_error(capsys, "exists", "--overwrite")
    assert cli.main(["sr", lr, "--ref", ref, "-o", lr, "--checkpoint", tiny_ckpt, "--overwrite"]) == 0
    assert Image.open(lr).size == (48, 48)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.png", "ref.png", "same.png"]


@pytest.mark.parametrize("out,words", [
    ("{tmp}", ["is a folder"]),
    ("{tmp}/x.xyz", ["unknown file extension", ".xyz"]),
    ("{tmp}/noext", ["unknown file extension"]),
    ("/proc/srntt-test/x.png", ["cannot write"]),
    ("{tmp}/file.png/x.png", ["cannot write"]),
])
def test_sr_output_path_problems_before_the_work(tmp_path, tiny_ckpt, capsys, no_work, out, words):
    lr = _img(tmp_path / "lr.png", 12, 12)
    (tmp_path / "file.png").write_bytes(b"")
    rc = cli.main(["sr", lr, "-o", out.format(tmp=tmp_path), "--checkpoint", tiny_ckpt])
    assert rc == 2
    _one_line_error(capsys, *words)


@pytest.mark.parametrize("device", ["foo", "cuda:99", "meta"])
def test_unknown_device_before_the_work(tmp_path, tiny_ckpt, capsys, no_work, device):
    lr = _img(tmp_path / "lr.png", 12, 12)
    assert cli.main(["sr", lr, "-o", str(tmp_path / "o.png"), "--device", device]) == 2
    _one_line_error(capsys, "device", repr(device))
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("flags,words", [(["--tile", "5"], ["tile", ">= 12"]),
                                         (["--tile", "16", "--overlap", "8"], ["overlap"])])
def test_bad_tiling_before_the_work(tmp_path, tiny_ckpt, capsys, no_work, flags, words):
    lr = _img(tmp_path / "lr.png", 12, 12)
    assert cli.main(["sr", lr, "-o", str(tmp_path / "o.png"), "--checkpoint", tiny_ckpt, *flags]) == 2
    _one_line_error(capsys, *words)


def test_missing_output_folder_is_created(tmp_path, tiny_ckpt):
    lr = _img(tmp_path / "lr.png", 12, 12)
    out = tmp_path / "new" / "deeper" / "sr.jpg"
    assert cli.main(["sr", lr, "-o", str(out), "--checkpoint", tiny_ckpt]) == 0
    assert Image.open(out).format == "JPEG"


def test_save_image_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "o.png"
    path.write_bytes(b"old")

    def broken(self, fp, format=None, **params):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        D.save_image(torch.zeros(3, 4, 4), path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_eval_csv_and_demo_outputs_checked_first(tmp_path, tiny_ckpt, capsys, no_work):
    data = tmp_path / "set"
    data.mkdir()
    _img(data / "a.png", 48, 96)
    (tmp_path / "r.csv").write_text("keep")
    assert cli.main(["eval", str(data), "--checkpoint", tiny_ckpt, "--csv", str(tmp_path / "r.csv")]) == 2
    _one_line_error(capsys, "--csv", "exists")
    assert (tmp_path / "r.csv").read_text() == "keep"
    image = _img(tmp_path / "hr.png", 32, 64)
    assert cli.main(["demo", "-o", str(tmp_path), "--image", image, "--checkpoint", tiny_ckpt]) == 2
    _one_line_error(capsys, "overwrite the input")
    assert cli.main(["demo", "-o", str(tmp_path / "r.csv"), "--image", image, "--checkpoint", tiny_ckpt]) == 2
    _one_line_error(capsys, "cannot write")


def test_bad_checkpoint_and_train_settings_are_one_line(tmp_path, capsys):
    lr = _img(tmp_path / "lr.png", 12, 12)
    nan = tmp_path / "nan.pt"
    model = SRNTT(ch=8, content_blocks=1, transfer_blocks=(1, 1, 1))
    model.texture_transfer.out[1].bias.data[0] = float("nan")
    export_model(model, nan)
    assert cli.main(["sr", lr, "-o", str(tmp_path / "o.png"), "--checkpoint", str(nan)]) == 2
    _one_line_error(capsys, "NaN or Inf")
    assert not (tmp_path / "o.png").exists()
    for flag in ("--batch", "--save-every"):
        assert cli.main(["train", str(tmp_path), "--out", str(tmp_path / "run"), flag, "0"]) == 2
        _one_line_error(capsys, flag.lstrip("-").replace("-", "_"), "[1,")


def test_pixel_limit_from_the_header(tmp_path, tiny_ckpt, capsys, no_work):
    big = _png_header(tmp_path / "big.png", 9000, 9000)  # 81 MP in a few hundred bytes
    with pytest.raises(D.ImageTooLargeError, match="9000x9000 = 81,000,000 pixels.*limit of 64,000,000"):
        D.load_image(big)
    assert cli.main(["sr", big, "-o", str(tmp_path / "o.png"), "--checkpoint", tiny_ckpt]) == 2
    _one_line_error(capsys, "81,000,000 pixels", "--max-pixels")
    bomb = _png_header(tmp_path / "bomb.png", 30000, 30000)  # beyond Pillow's own bomb limit
    with pytest.raises(D.ImageTooLargeError):
        D.load_image(bomb, max_pixels=10**10)
    lr = _img(tmp_path / "lr.png", 30, 40)
    assert cli.main(["sr", lr, "-o", str(tmp_path / "o.png"), "--max-pixels", "1000"]) == 2
    _one_line_error(capsys, "40x30 = 1,200 pixels")
    assert cli.main(["sr", lr, "-o", str(tmp_path / "o.png"), "--max-pixels", "5000"]) == 2
    _one_line_error(capsys, "x4 output would be 160x120 = 19,200 pixels")
    with pytest.raises(SystemExit):
        cli.main(["sr", lr, "-o", str(tmp_path / "o.png"), "--max-pixels", "0"])
    assert "--max-pixels: must be >= 1" in capsys.readouterr().err


def test_eval_names_the_unusable_image(tmp_path, tiny_ckpt, capsys):
    data = tmp_path / "set"
    data.mkdir()
    _img(data / "a.png", 48, 96)
    Image.new("RGB", (2, 2)).save(data / "tiny.png")
    assert cli.main(["eval", str(data), "--checkpoint", tiny_ckpt]) == 2
    _one_line_error(capsys, "tiny.png", "smaller")


def test_sr_folder_input_is_checked_before_work(tmp_path, tiny_ckpt, capsys):
    inputs, refs = tmp_path / "lr", tmp_path / "refs"
    inputs.mkdir()
    refs.mkdir()
    for name in ("a", "b"):
        _img(inputs / f"{name}.png", 12, 12)
    _img(refs / "a.jpg", 30, 30, 1)
    out = tmp_path / "out"
    rc = cli.main(["sr", str(inputs), "--ref", str(refs), "-o", str(out), "--checkpoint", tiny_ckpt])
    assert rc == 2 and "no reference named like b.png" in capsys.readouterr().err and not out.exists()
    _img(refs / "b.png", 30, 30, 2)
    (tmp_path / "file.png").write_bytes(b"")
    rc = cli.main(["sr", str(inputs), "--ref", str(refs), "-o", str(tmp_path / "file.png"),
                   "--checkpoint", tiny_ckpt])
    assert rc == 2 and "needs an output folder" in capsys.readouterr().err
    rc = cli.main(["sr", str(inputs), "-o", str(out), "--checkpoint", tiny_ckpt, "--device", "cpu"])
    assert rc == 0 and "2 written" in capsys.readouterr().out  # no --ref: no-reference mode
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]


def test_swap_demo_figure_and_its_output_checks(tmp_path, capsys, monkeypatch):
    from srntt_core import swap

    image = _img(tmp_path / "sample.png", 48, 96)
    out = tmp_path / "fig" / "swap.png"
    assert cli.main(["swap-demo", "-o", str(out), "--sample", image, "--backend", "torch"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert Image.open(out).size[0] >= 4 * 48  # the four 48-pixel panels side by side

    def refuse(*a, **k):
        raise AssertionError("the swap work started before the error was found")

    monkeypatch.setattr(swap.TextureSwapper, "__call__", refuse)
    assert cli.main(["swap-demo", "-o", str(tmp_path / "fig.txt"), "--sample", image]) == 2
    _one_line_error(capsys, "-o/--out", "extension")
    before = Path(image).read_bytes()
    assert cli.main(["swap-demo", "-o", image, "--sample", image]) == 2
    _one_line_error(capsys, "-o/--out", "refusing to overwrite an input")
    assert Path(image).read_bytes() == before
    # a failed save leaves the previous figure whole (the write is atomic)
    old = out.read_bytes()
    monkeypatch.undo()
    monkeypatch.setattr(Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    assert cli.main(["swap-demo", "-o", str(out), "--sample", image, "--backend", "torch"]) != 0
    _one_line_error(capsys, "disk full")
    assert out.read_bytes() == old
