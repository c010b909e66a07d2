"""Loads the compiled extension ``srntt_core._C`` and remembers why, if it could not."""

from __future__ import annotations

import functools
import importlib
import warnings

import torch

LOADED = False
LOAD_ERROR: str | None = None

try:
    importlib.import_module("srntt_core._C")  # registers the srntt::_*_fused ops

    LOADED = True
except Exception as exc:  # ImportError, OSError (undefined symbol, wrong torch ABI), ...
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"srntt_core: the compiled extension srntt_core._C could not be loaded ({LOAD_ERROR}); "
        "the 'cpu' and 'cuda' backends are unavailable, the 'torch' backend still works. "
        "Rebuild with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``srntt::<op>`` exists and has a kernel for ``dispatch_key`` (e.g. "CPU", "CUDA")."""
    if not LOADED:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"srntt::{op}", dispatch_key)
    except RuntimeError:  # operator not registered
        return False


@functools.cache
def cuda_kernel_image(device_index: int) -> int | None:
    """Architecture (e.g. 90) of the CUDA kernel image the extension runs on that GPU, 0 when it has
    none for the GPU's compute capability, None when the extension has no CUDA kernels."""
    if not has_kernel("_patch_match_fused", "CUDA"):
        return None
    return int(torch.ops.srntt._cuda_kernel_image(device_index))
