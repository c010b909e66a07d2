"""Checkpoint files: atomic saving, safe loading and validation, shared by training and inference.

Every file is read with ``torch.load(weights_only=True)``: only tensors and primitive
containers (dict, list, tuple, str, int, float, bool, None) are unpickled, so a crafted file
cannot run code. What comes out is then checked before anything is built from it:

- the network configuration (types and ranges, :func:`srntt_core.models.srntt.validate_config`);
- the weights against a parameter-free ("meta") copy of the network: every key present, every
  shape equal, every value finite. Only then is the network allocated, so a small file cannot
  make the loader allocate more than the weights it actually holds;
- a training state's step, time, optimizer and RNG state (:func:`validate_train_state`).

Two kinds of file: ``"srntt-generator"`` (inference: config + weights, maybe float16) and
``"srntt-train-state"`` (a resumable run: generator, critic, optimizers, step, RNG state).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .srntt import SRNTT, validate_config

CKPT_FORMAT = "srntt-core/1"
GENERATOR_KIND = "srntt-generator"
TRAIN_STATE_KIND = "srntt-train-state"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is refused, or does not fit the network."""


# ---------------------------------------------------------------------------------------------
# writing

def temp_name_prefix(path: Path) -> str:
    """Prefix of the temporary files :func:`atomic_write` makes next to ``path``."""
    return path.name + ".tmp"


def atomic_write(path: str | os.PathLike, write) -> Path:
    """``write(file)`` into a temporary file in ``path``'s folder, fsync, then ``os.replace``.

    A crash leaves either the old file or the new one, never a truncated one; the temporary
    file is removed when ``write`` fails.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_name_prefix(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_partials(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files an interrupted :func:`atomic_write` of ``path`` left behind."""
    path = Path(path)
    stale = sorted(path.parent.glob(temp_name_prefix(path) + "*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write` (creates the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: torch.save(obj, f))


def generator_checkpoint(model: SRNTT, *, fp16: bool = False, meta: dict | None = None) -> dict:
    state = {k: (v.half() if fp16 and v.is_floating_point() else v).detach().cpu().clone()
             for k, v in model.state_dict().items()}
    return {"format": CKPT_FORMAT, "kind": GENERATOR_KIND, "config": dict(model.config),
            "state_dict": state, "meta": meta or {}}


def export_model(model: SRNTT, path: str | os.PathLike, *, fp16: bool = True,
                 meta: dict | None = None) -> Path:
    return atomic_save(generator_checkpoint(model, fp16=fp16, meta=meta), path)


# ---------------------------------------------------------------------------------------------
# reading

def safe_load(path: str | os.PathLike) -> dict:
    """Read a checkpoint with ``weights_only=True`` onto the CPU; must hold a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a torch checkpoint, corrupt, or holding objects other "
            f"than tensors and plain containers (refused, nothing executed): {first}"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def _state_and_config(obj: dict, path) -> tuple[dict, dict]:
    kind = obj.get("kind")
    if kind == GENERATOR_KIND:
        state, config = obj.get("state_dict"), obj.get("config", {})
    elif kind == TRAIN_STATE_KIND:
        state, config = obj.get("model"), obj.get("model_config", {})
    elif isinstance(obj.get("state_dict"), dict):
        state, config = obj["state_dict"], obj.get("config", {})
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, config = obj, {}  # a bare state dict: the default network
    else:
        raise CheckpointError(f"{path}: not an SRNTT checkpoint (keys: {sorted(map(str, obj))[:8]})")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the weights are a {type(state).__name__}, expected a dict")
    return state, config


def check_state_dict(state: Mapping, reference: nn.Module, path, what: str) -> None:
    """``state`` must have exactly ``reference``'s keys, shapes and finite values (dtype free)."""
    own = reference.state_dict()
    bad_type = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad_type:
        raise CheckpointError(f"checkpoint {path}: weights for {what} that are not tensors, "
                              f"e.g. {bad_type[:3]}")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:2]}")
        raise CheckpointError(f"checkpoint {path} does not fit {what}: " + "; ".join(parts))
    kinds = [k for k in own if state[k].is_floating_point() != own[k].is_floating_point()]
    if kinds:
        raise CheckpointError(f"checkpoint {path}: wrong dtypes for {what}, e.g. {kinds[:3]}")
    bad = _non_finite(state)
    if bad:
        raise CheckpointError(f"checkpoint {path}: NaN or Inf values in the weights of {what}, "
                              f"{len(bad)} tensor(s), e.g. {bad[:3]}")


def _non_finite(state: Mapping) -> list[str]:
    """The keys of ``state``'s floating-point tensors that hold a NaN or an Inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not _all_finite(v)]


def _all_finite(t: torch.Tensor) -> bool:
    # NB: numpy runs in the calling thread, while torch's isfinite / all wait on the intra-op thread
    # pool per tensor: for the ~570 tensors of a generator on a busy 2-core machine, seconds.
    if t.device.type == "cpu":
        try:
            return bool(np.isfinite(t.detach().numpy()).all())
        except TypeError:  # dtypes numpy lacks (bfloat16, float8)
            pass
    return bool(torch.isfinite(t).all())


def _float32_copy(t: torch.Tensor) -> torch.Tensor:
    # NB: in the calling thread, as _all_finite: one pooled cast per tensor costs seconds when busy.
    if t.device.type == "cpu":
        try:
            return torch.from_numpy(t.detach().numpy().astype(np.float32))
        except TypeError:
            pass
    return t.to(torch.float32, copy=True)


def build_generator(config, state: Mapping, path) -> SRNTT:
    """A float32 SRNTT from ``config`` and ``state``, both checked before any allocation."""
    try:
        kwargs = validate_config(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad network configuration: {e}") from e
    with torch.device("meta"):
        model = SRNTT(**kwargs)
    check_state_dict(state, model, path, f"SRNTT({kwargs})")
    # The checked skeleton becomes the network: its meta tensors are replaced by float32 copies of
    # the weights (NB: SRNTT keeps every tensor in its state dict, so none is left on the meta device).
    model.load_state_dict({k: _float32_copy(v) if v.is_floating_point() else v.clone()
                           for k, v in state.items()}, assign=True)
    return model


def load_generator(path: str | os.PathLike) -> SRNTT:
    """The SRNTT generator of a generator or training checkpoint, float32, on the CPU."""
    obj = safe_load(path)
    state, config = _state_and_config(obj, path)
    return build_generator(config, state, path)


# ---------------------------------------------------------------------------------------------
# training state

def _require(cond: bool, path, message: str) -> None:
    if not cond:
        raise CheckpointError(f"{path}: not a valid training state: {message}")


def check_optimizer_state(sd, params: list[torch.Tensor], path, what: str) -> None:
    """An optimizer ``state_dict`` whose per-parameter tensors match ``params``' shapes."""
    _require(isinstance(sd, dict) and isinstance(sd.get("state"), dict)
             and isinstance(sd.get("param_groups"), list), path, f"{what} is not an optimizer state")
    ids = [i for g in sd["param_groups"] if isinstance(g, dict) for i in g.get("params", [])]
    _require(len(ids) == len(params) and all(isinstance(i, int) for i in ids), path,
             f"{what} has {len(ids)} parameters, the network {len(params)}")
    for i, p in zip(ids, params, strict=True):
        entry = sd["state"].get(i, {})
        _require(isinstance(entry, dict), path, f"{what} state {i} is not a dict")
        for k, v in entry.items():
            _require(isinstance(v, (torch.Tensor, int, float)), path, f"{what} state {i}.{k} is not a tensor")
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                _require(v.shape == p.shape, path,
                         f"{what} state {i}.{k} has shape {tuple(v.shape)}, the parameter {tuple(p.shape)}")
                _require(bool(torch.isfinite(v).all()), path, f"{what} state {i}.{k} has NaN or Inf values")


def validate_train_state(state: dict, path) -> None:
    """Structure and primitive fields of a ``"srntt-train-state"`` (the tensors are checked on use)."""
    _require(state.get("kind") == TRAIN_STATE_KIND, path, f"kind is {state.get('kind')!r}")
    step, elapsed = state.get("step"), state.get("elapsed")
    _require(isinstance(step, int) and not isinstance(step, bool) and step >= 0, path,
             f"step is {step!r}, expected an integer >= 0")
    _require(isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool)
             and math.isfinite(elapsed) and elapsed >= 0, path, f"elapsed is {elapsed!r}")
    for key in ("train_config", "model_config", "model", "opt"):
        _require(isinstance(state.get(key), dict), path, f"{key} is missing or not a dict")
    for key in ("critic", "d_opt", "scaler"):
        _require(state.get(key) is None or isinstance(state[key], dict), path, f"{key} is not a dict")
    rng = state.get("rng")
    _require(rng is None or (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.dim() == 1
                             and rng.numel() == torch.get_rng_state().numel()),
             path, "rng is not a torch CPU generator state")
