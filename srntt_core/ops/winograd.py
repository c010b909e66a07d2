"""Winograd F(4x4, 3x3) convolution on the CPU (``srntt::_winograd_conv3x3``, csrc/cpu/winograd_cpu.h).

A 3x3, stride-1, zero-padding-1 convolution of a channels_last float32 map with 36 instead of 144
multiplies per 4x4 output tile and (Cin, Cout) pair, for inference; the ReLU and a residual add
are fused into its output stage. Its float32 error is some ten times that of a direct convolution
(tests/test_winograd.py measures it). Use::

    if winograd.available() and winograd.eligible(conv.weight, x, stride=conv.stride, ...):
        packed = winograd.pack(conv.weight)           # once per weight
        y = winograd.conv3x3(x, packed, conv.bias, other=residual, relu=True)
"""

from __future__ import annotations

import functools

import torch

from . import extension
from .geometry import CONV_CHANNELS_MAX

CHANNEL_ALIGN = 8  # Cin and Cout are multiples of this (one AVX2 vector of float32)


@functools.cache
def available() -> bool:
    """Whether the op is built and this CPU runs its AVX2 (or better) variant: the baseline x86-64
    variant is correct but slower than oneDNN's direct convolution."""
    if not extension.has_kernel("_winograd_conv3x3", "CPU"):
        return False
    return str(torch.ops.srntt._cpu_capability()) in ("avx2", "avx512", "native")


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def eligible(weight: torch.Tensor, x: torch.Tensor, *, stride=1, padding=1, dilation=1, groups: int = 1,
             padding_mode: str = "zeros") -> bool:
    """Whether ``conv2d(x, weight, stride=..., padding=..., dilation=..., groups=...)`` (with the
    given ``padding_mode``) is a convolution :func:`conv3x3` computes: a 3x3 float32 filter on the
    CPU, stride 1, zero padding 1, dilation 1, one group, Cin and Cout multiples of 8, at most
    ``CONV_CHANNELS_MAX``. ``x`` may be in either memory format (:func:`conv3x3` needs
    channels_last)."""
    return (weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3) and x.dim() == 4
            and weight.dtype == torch.float32 and x.dtype == torch.float32
            and weight.device.type == "cpu" and x.device.type == "cpu"
            and _pair(stride) == (1, 1) and _pair(padding) == (1, 1) and _pair(dilation) == (1, 1)
            and groups == 1 and padding_mode == "zeros" and x.shape[1] == weight.shape[1]
            and weight.shape[0] % CHANNEL_ALIGN == 0 and weight.shape[1] % CHANNEL_ALIGN == 0
            and max(weight.shape[:2]) <= CONV_CHANNELS_MAX)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The transformed filters of ``weight`` (Cout, Cin, 3, 3) for :func:`conv3x3` (36 x Cin x Cout
    floats); compute once per weight."""
    return torch.ops.srntt._winograd_pack(weight.detach())


def conv3x3(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
            other: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """``relu?(conv2d(x, weight, bias, padding=1) + other)`` for ``packed = pack(weight)``: ``x``
    (N, Cin, H, W) and ``other`` (N, Cout, H, W) channels_last float32 on the CPU; the result is
    channels_last. No autograd (inference)."""
    return torch.ops.srntt._winograd_conv3x3(x, packed, None if bias is None else bias.detach(), other, relu)


def _register_fakes() -> None:
    """Fake kernels, so that the ops trace under torch.compile."""

    @torch.library.register_fake("srntt::_winograd_pack")
    def _pack_fake(weight):
        return weight.new_empty((36, weight.shape[1], weight.shape[0]))

    @torch.library.register_fake("srntt::_winograd_conv3x3")
    def _conv_fake(x, packed, bias, other, relu):
        n, _, h, w = x.shape
        return torch.empty((n, packed.shape[2], h, w), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)


if extension.has_kernel("_winograd_conv3x3", "CPU"):
    _register_fakes()
