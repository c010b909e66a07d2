"""Inference copies of the networks that do less work per pixel.

- :func:`fold_batchnorm`: every ``Conv2d`` followed by an eval-mode ``BatchNorm2d`` in a
  ``Sequential`` becomes one convolution with a bias (torch's ``fuse_conv_bn_eval``); the BN
  becomes ``Identity``. The source model is not modified (training keeps its BatchNorm).
- :func:`inference_copy`: the folded copy, frozen, in eval mode, optionally ``channels_last``.

NB: folding changes the float32 rounding (the BN scale is multiplied into the weights once
instead of applied to the output), so outputs differ from the unfolded network by a few ulps
of the activations; tests/test_fast_inference.py bounds the difference on the SR output.
"""

from __future__ import annotations

import copy

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
