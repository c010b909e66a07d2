"""Inference copies of the networks that do less work per pixel.

- :func:`fold_batchnorm`: every ``Conv2d`` followed by an eval-mode ``BatchNorm2d`` in a
  ``Sequential`` becomes one convolution with a bias (torch's ``fuse_conv_bn_eval``); the BN
  becomes ``Identity``. The source model is not modified (training keeps its BatchNorm).
- :func:`inference_copy`: the folded copy, frozen, in eval mode, optionally ``channels_last``.
- :func:`fast_generator`: the inference copy (optionally ``torch.compile``d) kept per model and
  rebuilt when the model's weights change, so that repeated inference folds once.

NB: folding changes the float32 rounding (the BN scale is multiplied into the weights once
instead of applied to the output), so outputs differ from the unfolded network by a few ulps
of the activations; tests/test_fast_inference.py bounds the difference on the SR output.
"""

from __future__ import annotations

import copy
import weakref

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each ``Conv2d -> BatchNorm2d`` pair folded into the conv.

    Raises ValueError if a BatchNorm2d is left that does not follow a Conv2d in a Sequential
    (the copy would then silently keep per-pixel BN work).
    """
    folded = copy.deepcopy(model).eval()
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    if has_batchnorm(folded):
        left = [name for name, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
        raise ValueError(f"model: BatchNorm2d not preceded by a Conv2d, cannot fold: {left}")
    return folded


def inference_copy(model: nn.Module, channels_last: bool = False) -> nn.Module:
    """:func:`fold_batchnorm`, frozen (``requires_grad`` off), optionally in ``channels_last``."""
    fast = fold_batchnorm(model).requires_grad_(False)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    return fast


class _Cached:
    """The variants built from one model, and the weights they were built from."""

    def __init__(self, model: nn.Module):
        self.snapshot = [t.detach().clone() for t in _weights(model)]
        self.variants: dict[tuple, nn.Module] = {}

    def current(self, model: nn.Module) -> bool:
        now = _weights(model)
        return len(now) == len(self.snapshot) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and _equal(a, b)
            for a, b in zip(now, self.snapshot, strict=True))


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach() for t in model.state_dict(keep_vars=True).values()]


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    # NB: on the CPU numpy compares in the calling thread, while torch.equal's parallel kernel waits
    # on the intra-op thread pool: for the ~570 tensors of the bundled generator on a busy 2-core
    # machine, 0.1 s against 2 s.
    if a.device.type == "cpu":
        try:
            return bool(np.array_equal(a.numpy(), b.numpy()))
        except TypeError:  # dtypes numpy lacks (bfloat16, float8)
            pass
    return torch.equal(a, b)


# NB: keyed weakly by the model, and no variant refers to it (each is a deep copy), so a dropped
# model frees its copies. The weights are compared by value on every lookup (a pass over ~18 MB
# for the bundled generator) rather than by tensor version counters, which neither writes through
# ``.data`` nor BatchNorm's running-statistics updates bump: a training loop that validates between
# steps gets the current weights.
_CACHE: weakref.WeakKeyDictionary[nn.Module, _Cached] = weakref.WeakKeyDictionary()


def fast_generator(model: nn.Module, *, channels_last: bool = True,
                   compile_mode: str | None = None) -> nn.Module:
    """The network inference runs for ``model``: its :func:`inference_copy` (BatchNorm folded, frozen)
    when it has BatchNorm, else ``model`` itself; with ``compile_mode`` (a ``torch.compile`` mode:
    "default", "reduce-overhead" for CUDA graphs, ...) the copy compiled by inductor, specialized per
    input shape (torch recompiles for each new tile shape, up to its recompile limit).

    Built once per model and kept until the model's weights change (then rebuilt).
    """
    if compile_mode is None and not has_batchnorm(model):
        return model
    entry = _CACHE.get(model)
    if entry is None or not entry.current(model):
        entry = _CACHE[model] = _Cached(model)
    plain = (channels_last, None)
    if plain not in entry.variants:
        entry.variants[plain] = inference_copy(model, channels_last=channels_last)
    key = (channels_last, compile_mode)
    if key not in entry.variants:
        entry.variants[key] = torch.compile(entry.variants[plain], mode=compile_mode, dynamic=False)
    return entry.variants[key]
