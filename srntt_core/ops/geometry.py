"""Patch-grid geometry, eps and the bounds of every integer argument of the ops, defined once.

The public API (:mod:`srntt_core.swap`), the op layer (:mod:`srntt_core.ops.library`) and the ``torch``
backend (:mod:`srntt_core.ops.torch_backend`) use this module. The C++ and CUDA kernels take the same
facts from csrc/srntt_geometry.h and check the bounds at their entry (csrc/srntt_limits.h);
tests/test_bounds.py checks that the two sides agree. The rules are documented in docs/DESIGN.md,
"Bounds and bad input".
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

# Cosine similarity: <q, k> / (max(|q|, EPS) * max(|k|, EPS)).
EPS = 1e-12

# Bounds of the integer arguments. Each is far above any real use (SRNTT/TTSR: 3x3 patches,
# stride 1, padding 0-1, scales 1-4) and keeps every size a kernel computes far from int64
# overflow and every piece of work finite.
PATCH_SIZE_MAX = 64
STRIDE_MAX = 64
PADDING_MAX = 64
SCALE_MAX = 16  # feature_swap's scale, weight_maps' scales
SIDE_MAX = 1 << 16  # out_size, per side
# Patch-grid cells of one index (B * Gh * Gw): a 16k x 16k image has 2**24 relu3_1 cells.
CELLS_MAX = 1 << 25
# Values in one patch descriptor (C * patch_size**2; relu3_1 3x3: 2304): bounds the kernels'
# per-thread tiles of descriptors.
DESCRIPTOR_MAX = 1 << 18
# Best keys per query patch of a top-k match (patch_match's k).
TOPK_MAX = 64
# Elements of any tensor an op allocates; also the int32 offset range of the GPU kernels.
ELEMENTS_MAX = (1 << 31) - 1
# Input and output channels of the Winograd convolution (SRNTT and VGG19 layers have <= 512).
CONV_CHANNELS_MAX = 4096


def grid_size(size: int, patch_size: int, stride: int, padding: int) -> int:
    """Patches along one side of a ``size`` map: G = (size + 2*padding - patch_size) // stride + 1."""
    return (size + 2 * padding - patch_size) // stride + 1


def check_int(name: str, value, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi]; TypeError for a non-integer (bool included), ValueError
    naming ``name`` and the bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name}: must be in [{lo}, {hi}], got {value}")
    return value


def check_patch(patch_size, stride, padding) -> tuple[int, int, int]:
    """The patch parameters, bounded: patch_size, stride in [1, 64], padding in [0, 64]."""
    patch_size = check_int("patch_size", patch_size, 1, PATCH_SIZE_MAX)
    stride = check_int("stride", stride, 1, STRIDE_MAX)
    padding = check_int("padding", padding, 0, PADDING_MAX)
    return patch_size, stride, padding


def check_scale(name: str, scale) -> int:
    return check_int(name, scale, 1, SCALE_MAX)


def check_side(name: str, size, lo: int = 1) -> int:
    return check_int(name, size, lo, SIDE_MAX)


def check_cells(name: str, cells: int) -> None:
    if cells > CELLS_MAX:
        raise ValueError(f"{name}: {cells} patch-grid cells, more than the limit {CELLS_MAX}")


def check_descriptor(name: str, channels: int, patch_size: int) -> None:
    n = channels * patch_size * patch_size
    if n > DESCRIPTOR_MAX:
        raise ValueError(f"{name}: {channels} channels x {patch_size}x{patch_size} patches make "
                         f"{n}-value descriptors, more than the limit {DESCRIPTOR_MAX}")


def check_elements(name: str, shape: Sequence[int], element_size: int = 4) -> None:
    """A tensor of ``shape`` an op would allocate stays within ELEMENTS_MAX; the error says
    how much memory it would need."""
    n = math.prod(shape)
    if n > ELEMENTS_MAX:
        raise ValueError(
            f"{name}: would need a {'x'.join(map(str, shape))} tensor ({n} elements, "
            f"{n * element_size / 2**30:.3g} GiB), more than the limit of {ELEMENTS_MAX} elements")


def map_grid(name: str, h: int, w: int, patch_size: int, stride: int, padding: int) -> tuple[int, int]:
    """The patch grid of an h x w map; ValueError naming ``name`` when it is smaller than one patch."""
    gh, gw = grid_size(h, patch_size, stride, padding), grid_size(w, patch_size, stride, padding)
    if gh < 1 or gw < 1:
        raise ValueError(f"{name}: a {h}x{w} map is smaller than one patch "
                         f"(patch_size={patch_size}, padding={padding})")
    return gh, gw


def value_grid(name: str, h: int, w: int, scale: int, patch_size: int, stride: int,
               padding: int) -> tuple[int, int]:
    """The key grid of an h x w values map at ``scale`` (its key map is (h // scale, w // scale))."""
    if h < scale or w < scale:
        raise ValueError(f"{name}: a {h}x{w} map is smaller than scale={scale}")
    return map_grid(f"{name} (its key map, size // scale)", h // scale, w // scale, patch_size, stride,
                    padding)
