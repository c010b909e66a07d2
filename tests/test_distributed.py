"""Several processes on torch.distributed (gloo, CPU): training equivalence and resume across world
sizes, a killed rank, sharded ``sr`` and ``eval``. Ranks are separate processes started by the
tests with torchrun's environment variables (what ``torchrun`` itself would set)."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import test_cli_network
import torch
from PIL import Image

from srntt_core import cli
from srntt_core.models import checkpoint as C
from srntt_core.models import distributed
from srntt_core.models import train as T

tiny_ckpt = test_cli_network.tiny_ckpt  # the fixture: a tiny exported generator
TINY = {"ch": 8, "content_blocks": 1, "transfer_blocks": [1, 1, 1]}
TRAIN = ("import json, sys; from srntt_core.models import train as T; "
         "T.train(T.TrainConfig(**json.loads(sys.argv[1])))")


def _img(path, h, w, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.BICUBIC).save(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("hr")
    for i, (h, w) in enumerate([(40, 72), (64, 48), (48, 56)]):
        _img(d / f"im{i}.png", h, w, i)
    return d


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argvs, **env_extra):
    """One process per argv, as ranks 0..W-1 of one job on this machine."""
    port = _free_port()
    procs = []
    for rank, argv in enumerate(argvs):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(argvs)),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **env_extra}
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout=120):
    """``(status, stdout, stderr)`` of every rank; a rank that hangs is killed (no stray process)."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def _cfg(folder, out, **kw):
    base = dict(data=[str(folder)], out=str(out), steps=2, batch=4, crop=16, ref_crop=24, lr=1e-3,
                residual="bicubic", model=TINY, save_every=100, progress=False, seed=3, batch_norm="frozen",
                num_threads=1, dist_timeout=30.0)
    base.update(kw)
    return base


def _weights(out):
    return C.safe_load(os.path.join(out, "last.pt"))["model"]


def test_half_set_environment_is_one_clear_error(folder, tmp_path, monkeypatch, capsys):
    for k in distributed.ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = cli.main(["train", str(folder), "--out", str(tmp_path / "run"), "--steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "half set" in err and "MASTER_ADDR" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        distributed.env_world()


def test_global_batch_must_divide_over_the_ranks():
    assert distributed.rank_slice(6, distributed.Context(rank=1, world_size=3)) == (2, 2)
    with pytest.raises(ValueError, match="batch: the global batch 5 must be a multiple of the world size 2"):
        distributed.rank_slice(5, distributed.Context(rank=0, world_size=2))


def test_global_samples_do_not_depend_on_the_world_size(folder):
    from srntt_core.models.data import TrainCrops

    data = TrainCrops([str(folder)], crop=16, ref_crop=24)
    one = distributed.GlobalSampler(len(data), 5).batch(data, 10, 4)
    halves = [distributed.GlobalSampler(len(data), 5).batch(data, 10 + o, 2) for o in (0, 2)]
    for a, b0, b1 in zip(one, *halves, strict=True):
        torch.testing.assert_close(a, torch.cat([b0, b1]), rtol=0, atol=0)
    # every item once per epoch, whatever the order
    sampler = distributed.GlobalSampler(len(data), 5)
    assert sorted(sampler.item(k)[0] for k in range(len(data), 2 * len(data))) == list(range(len(data)))


def test_two_ranks_equal_one_process_and_resume_with_one(folder, tmp_path):
    """2 ranks (2 samples each) and 1 process (4 samples) take the same steps: the gradients
    all-reduced by DDP are the mean over the global batch. NB: with batch statistics BN
    normalises each rank's samples with that rank's statistics (SyncBatchNorm, which would share
    them, is GPU-only in torch), so the test trains with frozen BN; float tolerance covers the
    different summation order of the all-reduce."""
    two = tmp_path / "two"
    procs = _launch([["-c", TRAIN, json.dumps(_cfg(folder, two))]] * 2)
    one = tmp_path / "one"
    T.train(T.TrainConfig(**_cfg(folder, one)))
    for rc, _, err in _finish(procs):
        assert rc == 0, err
    a, b = _weights(one), _weights(two)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert C.safe_load(two / "last.pt")["world_size"] == 2
    # a run of 2 ranks resumes with 1 process where 1 process would be
    T.train(T.TrainConfig(**_cfg(folder, one, steps=4)))
    T.train(T.TrainConfig(**_cfg(folder, two, steps=4)))
    a, b = _weights(one), _weights(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    with open(two / "loss.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]


def test_killed_rank_stops_the_job_and_a_restart_resumes(folder, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(folder, run, steps=10_000, save_every=1, batch=2, dist_timeout=20.0)
    procs = _launch([["-c", TRAIN, json.dumps(cfg)]] * 2)
    t0 = time.monotonic()
    while not (run / "last.pt").exists() or C.safe_load(run / "last.pt")["step"] < 2:
        if time.monotonic() - t0 > 90 or procs[0].poll() is not None:
            pytest.fail(f"no checkpoint at step 2: {_finish(procs, timeout=1)}")
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    (rc0, _, err0), (rc1, _, _) = _finish(procs, timeout=60)
    assert rc1 == -signal.SIGKILL
    assert rc0 != 0 and "DistributedError" in err0 and "another rank failed" in err0, err0
    assert "run the same command again to resume" in err0
    saved = C.safe_load(run / "last.pt")["step"]
    assert 2 <= saved < 10_000
    summary = T.train(T.TrainConfig(**{**cfg, "steps": saved + 1}))
    assert summary["step"] == saved + 1 and summary["world_size"] == 1
    with open(run / "loss.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, saved + 2))


def test_sharded_sr_and_eval_with_two_ranks(tmp_path, tiny_ckpt, capsys):
    """sr: every image written once, by one rank, as one process writes it; a re-run skips what
    is done. eval: the table of 2 ranks is the table of 1 process (one job runs both commands)."""
    inputs, refs, hr = tmp_path / "lr", tmp_path / "refs", tmp_path / "hr"
    for d in (inputs, refs, hr):
        d.mkdir()
    for i in range(5):
        _img(inputs / f"p{i}.png", 12 + i, 16, i)
        _img(refs / f"p{i}.jpg", 40, 36, 10 + i)
    for i in range(3):
        _img(hr / f"e{i}.png", 32, 64, i)
    common = ["--checkpoint", tiny_ckpt, "--device", "cpu", "--tile", "0"]
    sr = ["sr", str(inputs), "--ref", str(refs), *common, "-o"]
    ev = ["eval", str(hr), *common, "--rows", "bicubic,srntt_ref", "--csv"]
    script = ("import sys; from srntt_core import cli; a = sys.argv[1:]; i = a.index('--then'); "
              "sys.exit(cli.main(a[:i]) or cli.main(a[i + 1:]))")
    argv = ["-c", script, *sr, str(tmp_path / "two"), "--then", *ev, str(tmp_path / "two.csv")]
    procs = _launch([argv] * 2)
    assert cli.main([*sr, str(tmp_path / "one")]) == 0
    assert "5 written, 0 skipped" in capsys.readouterr().out
    assert cli.main([*ev, str(tmp_path / "one.csv")]) == 0
    table = capsys.readouterr().out.split("\n(")[0]
    (rc0, out0, err0), (rc1, out1, err1) = _finish(procs)
    assert rc0 == 0 and rc1 == 0, err0 + err1
    assert "5 image(s): 5 written, 0 skipped" in out0 and "2 rank(s)" in out0 and out1 == ""
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / "one" / f"p{i}.png"))
        b = np.asarray(Image.open(tmp_path / "two" / f"p{i}.png"))
        assert a.shape == ((12 + i) * 4, 64, 3) and np.array_equal(a, b)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [f"p{i}.png" for i in range(5)]
    assert table in out0 and "3 images" in table and "x 2 ranks" in out0
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()
    # a re-run skips what is done and redoes a missing output
    (tmp_path / "two" / "p3.png").unlink()
    assert cli.main([*sr, str(tmp_path / "two")]) == 0
    assert "1 written, 4 skipped" in capsys.readouterr().out


def test_sr_csv_shares_reference_features(tmp_path, tiny_ckpt, monkeypatch, capsys):
    from srntt_core.models import infer

    for i in range(3):
        _img(tmp_path / f"in{i}.png", 12, 12, i)
    _img(tmp_path / "ref.png", 32, 32, 9)
    _img(tmp_path / "ref2.png", 32, 32, 8)
    rows = "input,ref\nin0.png,ref.png\nin1.png,ref.png,ref2.png\nin2.png,ref.png\n"
    (tmp_path / "jobs.csv").write_text(rows)
    built = []
    real = infer.ReferenceBank.__init__

    def counting(self, refs, *a, **k):
        built.append(len(refs))
        real(self, refs, *a, **k)

    monkeypatch.setattr(infer.ReferenceBank, "__init__", counting)
    rc = cli.main(["sr", str(tmp_path / "jobs.csv"), "-o", str(tmp_path / "out"), "--checkpoint", tiny_ckpt,
                   "--device", "cpu"])
    assert rc == 0 and "3 written" in capsys.readouterr().out
    assert sorted(built) == [1, 2]  # in0 and in2 share one bank
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["in0.png", "in1.png", "in2.png"]
    (tmp_path / "bad.csv").write_text("in0.png,missing.png\n")
    rc = cli.main(["sr", str(tmp_path / "bad.csv"), "-o", str(tmp_path / "o2"), "--checkpoint", tiny_ckpt])
    assert rc == 2 and "missing.png" in capsys.readouterr().err
