"""Backend selection (docs/CONTRACT.md §8, the xformers pattern): auto, SRNTT_BACKEND, errors that say why."""

import pytest
import torch
from conftest import features

import srntt_core.swap as sw
from srntt_core.ops import dispatch, extension
from srntt_core.ops.dispatch import BackendUnavailableError

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("SRNTT_BACKEND", raising=False)


@pytest.fixture
def calls(monkeypatch):
    """Records which backend object each public op actually ran on."""
    seen = []
    for name in dispatch.BACKENDS:
        impl = dispatch.get(name)
        for op in ("patch_match", "feature_swap", "feature_swap_backward"):
            original = getattr(impl, op)

            def spy(*args, _original=original, _name=name, _op=op):
                seen.append((_name, _op))
                return _original(*args)

            monkeypatch.setattr(impl, op, spy)
    return seen


def _run_both(**kw):
    query, key = features(1, 3, 7, 8, seed=1), features(1, 3, 6, 9, seed=2)
    match = sw.patch_match(query, key, **kw)
    sw.feature_swap(key, match.index, **kw)


def test_torch_backend_always_available():
    assert "torch" in sw.available("cpu")
    assert "torch" in sw.available(CPU)
    assert dispatch.get("torch").not_supported_reasons(CPU) == []


def test_cpu_backend_available_iff_extension_loaded():
    has_cpu_kernels = extension.LOADED and extension.has_kernel("_patch_match_fused", "CPU")
    assert ("cpu" in sw.available("cpu")) == has_cpu_kernels
    if not extension.LOADED:
        assert extension.LOAD_ERROR  # the real error is kept, not swallowed


def test_cuda_backend_not_available_for_cpu_tensors():
    assert "cuda" not in sw.available("cpu")
    assert any("cuda" in r for r in dispatch.get("cuda").not_supported_reasons(CPU))


def test_auto_prefers_cpu_kernels_then_torch(calls):
    want = "cpu" if "cpu" in sw.available("cpu") else "torch"
    assert dispatch.resolve("auto", CPU) == want
    _run_both()
    assert calls == [(want, "patch_match"), (want, "feature_swap")]


def test_auto_never_picks_the_triton_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve("auto", CPU) in ("cpu", "torch")


def test_explicit_backend_is_used(backend, calls):
    values = features(1, 3, 6, 9, seed=2, device=backend.device).requires_grad_()
    match = sw.patch_match(features(1, 3, 7, 8, seed=1, device=backend.device), values, backend=backend.name)
    sw.feature_swap(values, match.index, backend=backend.name).sum().backward()
    assert calls == [(backend.name, "patch_match"), (backend.name, "feature_swap"),
                     (backend.name, "feature_swap_backward")]


def test_env_overrides_auto(monkeypatch, calls):
    monkeypatch.setenv("SRNTT_BACKEND", "torch")
    assert dispatch.resolve("auto", CPU) == "torch"
    _run_both()
    assert calls == [("torch", "patch_match"), ("torch", "feature_swap")]


def test_env_does_not_override_an_explicit_backend(monkeypatch, calls):
    names = [n for n in sw.available("cpu") if n in ("cpu", "torch")]
    explicit = names[0]
    monkeypatch.setenv("SRNTT_BACKEND", "torch" if explicit == "cpu" else "cpu")
    _run_both(backend=explicit)
    assert calls == [(explicit, "patch_match"), (explicit, "feature_swap")]


def test_env_auto_or_empty_means_auto(monkeypatch):
    want = dispatch.resolve("auto", CPU)
    for value in ("auto", ""):
        monkeypatch.setenv("SRNTT_BACKEND", value)
        assert dispatch.resolve("auto", CPU) == want


def test_env_unknown_backend_is_named(monkeypatch):
    monkeypatch.setenv("SRNTT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SRNTT_BACKEND") as info:
        sw.patch_match(features(1, 3, 7, 8), features(1, 3, 6, 9))
    assert "fastest" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuda can run here")
def test_env_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("SRNTT_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        sw.patch_match(features(1, 3, 7, 8), features(1, 3, 6, 9))


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuda can run here")
@pytest.mark.parametrize("op", ["patch_match", "feature_swap"])
def test_unavailable_backend_lists_every_backends_reasons(op):
    key = features(1, 3, 6, 9)
    with pytest.raises(BackendUnavailableError) as info:
        if op == "patch_match":
            sw.patch_match(features(1, 3, 7, 8), key, backend="cuda")
        else:
            sw.feature_swap(key, torch.zeros(1, 5, 6, dtype=torch.long), backend="cuda")
    message = str(info.value)
    assert "'cuda'" in message
    for name in dispatch.BACKENDS:
        assert f"{name}:" in message, message
    assert "torch: ok" in message
    assert "needs cuda tensors" in message
    assert isinstance(info.value, RuntimeError)


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reasons = dispatch.get("triton").not_supported_reasons(CPU)
    assert reasons and all(isinstance(r, str) and r for r in reasons)
    with pytest.raises(BackendUnavailableError, match="triton"):
        dispatch.resolve("triton", CPU)


def test_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match="backend") as info:
        dispatch.resolve("gpu", CPU)
    for name in ("auto", *dispatch.BACKENDS):
        assert name in str(info.value)


def test_backend_report_covers_every_backend():
    report = dispatch.backend_report(CPU)
    assert [line.split(":")[0] for line in report] == list(dispatch.BACKENDS)
    assert "torch: ok" in report


def test_failed_extension_load_falls_back_to_torch_and_reports_the_error(monkeypatch, calls):
    """What users see when srntt_core._C cannot load (ABI mismatch, missing symbol, not built)."""
    monkeypatch.setattr(extension, "LOADED", False)
    monkeypatch.setattr(extension, "LOAD_ERROR", "OSError: undefined symbol: _ZN2at4_ops")
    assert "cpu" not in sw.available("cpu")
    assert dispatch.resolve("auto", CPU) == "torch"
    with pytest.raises(BackendUnavailableError, match="undefined symbol"):
        dispatch.resolve("cpu", CPU)
    _run_both()
    assert calls == [("torch", "patch_match"), ("torch", "feature_swap")]


def test_auto_and_explicit_give_the_same_answer():
    query, key = features(2, 5, 11, 9, seed=3), features(2, 5, 8, 12, seed=4)
    auto = sw.patch_match(query, key, padding=1)
    explicit = sw.patch_match(query, key, padding=1, backend=dispatch.resolve("auto", CPU))
    assert torch.equal(auto.index, explicit.index) and torch.equal(auto.score, explicit.score)
