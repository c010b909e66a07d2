"""Checkpoint files: weights_only loading, config / weight validation, training-state checks."""

import pytest
import torch

from srntt_core.models import checkpoint as C
from srntt_core.models import infer as I
from srntt_core.models import train as T
from srntt_core.models.srntt import SRNTT, validate_config

TINY = {"ch": 8, "content_blocks": 1, "transfer_blocks": [1, 1, 1]}


class CreatesMarker:
    """Unpickling this runs ``open(marker, "w")``: the marker file proves code was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = SRNTT(residual="bicubic", **TINY)
    return C.export_model(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt", fp16=False)


def test_resume_refuses_a_pickle_that_runs_code(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "marker"
    run.mkdir()
    torch.save({"format": C.CKPT_FORMAT, "kind": C.TRAIN_STATE_KIND, "step": CreatesMarker(marker)},
               run / "last.pt")
    data = tmp_path / "data"
    data.mkdir()
    cfg = T.TrainConfig(data=[str(data)], out=str(run), steps=1, model=TINY, residual="bicubic",
                        progress=False)
    with pytest.raises(C.CheckpointError, match="refused, nothing executed"):
        T.train(cfg)
    with pytest.raises(C.CheckpointError, match="refused"):
        I.load_model(run / "last.pt")
    assert not marker.exists()


@pytest.mark.parametrize("config,match", [
    ({"ch": 100000}, r"ch: must be in \[2, 256\]"),
    ([64, 16], "config: expected a dict"),
    ({"ch": "64"}, "ch: expected an integer"),
    ({"ch": True}, "ch: expected an integer"),
    ({"transfer_blocks": [1, 1]}, "transfer_blocks: expected three"),
    ({"transfer_blocks": [1, 10**9, 1]}, r"transfer_blocks\[1\]"),
    ({"content_blocks": -1}, "content_blocks"),
    ({"residual": "x"}, "residual"),
    ({"width": 3}, "unknown field"),
])
def test_bad_config_refused_before_building(tmp_path, config, match):
    path = tmp_path / "c.pt"
    torch.save({"kind": C.GENERATOR_KIND, "config": config, "state_dict": {}}, path)
    with pytest.raises(C.CheckpointError, match=match):
        I.load_model(path)


def test_srntt_constructor_validates_its_arguments():
    with pytest.raises(ValueError, match="ch: must be"):
        SRNTT(ch=100000)
    assert validate_config({"ch": 8, "transfer_blocks": [1, 2, 3]}) == {"ch": 8, "transfer_blocks": (1, 2, 3)}


def test_weights_checked_against_the_network_before_it_is_allocated(tmp_path, monkeypatch):
    path = tmp_path / "empty.pt"
    config = {"ch": 256, "content_blocks": 32}
    torch.save({"kind": C.GENERATOR_KIND, "config": config, "state_dict": {}}, path)
    built = []
    real = C.SRNTT

    def counting(*a, **k):
        built.append(torch.get_default_device())
        return real(*a, **k)

    monkeypatch.setattr(C, "SRNTT", counting)
    with pytest.raises(C.CheckpointError, match="missing key"):
        I.load_model(path)
    assert [d.type for d in built] == ["meta"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_refused(tmp_path, tiny, value):
    ckpt = torch.load(tiny, weights_only=True)
    ckpt["state_dict"]["texture_transfer.out.1.bias"][0] = value
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(C.CheckpointError, match="NaN or Inf.*texture_transfer.out.1.bias"):
        I.load_model(tmp_path / "bad.pt")


def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch):
    (tmp_path / "c.pt").write_bytes(b"old")

    def broken(obj, f):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        C.atomic_save({"a": 1}, tmp_path / "c.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert (tmp_path / "c.pt").read_bytes() == b"old"


def test_bundled_checkpoint_is_weights_only_and_valid():
    obj = C.safe_load(I.BUNDLED_CHECKPOINT)
    assert obj["kind"] == C.GENERATOR_KIND
    assert isinstance(C.load_generator(I.BUNDLED_CHECKPOINT), SRNTT)
