"""Backend selection per input (the xformers pattern).

Each backend says why it cannot run an op on given inputs (``not_supported_reasons(Inputs)``: the
device, the dtype its kernel gets, the sizes against the kernel's launch limits, top-k); ``auto``
takes the first that can in a per-device priority order, so inputs one kernel cannot take fall
back to the next backend instead of failing inside it. ``SRNTT_BACKEND`` overrides ``auto``, and
asking for one that cannot run the inputs raises :class:`BackendUnavailableError` listing every
backend's reasons. Given only a device, the backends answer for the device alone
(:func:`available`, :func:`backend_report`).
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import torch

from . import extension, torch_backend
from .geometry import grid_size

BACKENDS = ("cpu", "cuda", "triton", "torch")
PRIORITY = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
# CUDA launch grids: at most 65535 blocks along y and z. The kernels put the batch (and the
# Triton swap its channel blocks) there; the CUDA bindings check the same (csrc/cuda/*_binding.cu).
GRID_YZ_MAX = 65535
# Positions and bucket starts of the CUDA swap backward are int32: batch x key cells (+ 1 sentinel)
# must stay below 2**31 - 1.
INT32_MAX = (1 << 31) - 1
# The dtypes each op's compiled kernels take (float16/bfloat16 values are swapped in float32 and
# rounded once; patch_match inputs reach the kernels as float32 or float64).
KERNEL_DTYPES = {
    "patch_match": (torch.float32, torch.float64),
    "feature_swap": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


class BackendUnavailableError(RuntimeError):
    """The requested backend (or every backend, for ``auto``) cannot run these inputs."""


class Inputs(NamedTuple):
    """What an op is about to run: enough for every backend to tell whether it can.

    ``op`` is "patch_match" (``k`` > 1: top-k) or "feature_swap" (its backward runs on the same
    backend), or "" when only the device is known. ``query_size`` is the query map (patch_match) or
    the index grid (feature_swap); ``key_sizes`` the key maps or the values maps.
    """

    device: torch.device
    op: str = ""
    dtype: torch.dtype | None = None
    batch: int = 1
    channels: int = 1
    query_size: tuple[int, int] = (1, 1)
    key_sizes: tuple[tuple[int, int], ...] = ()
    patch_size: int = 3
    stride: int = 1
    padding: int = 0
    scale: int = 1
    k: int = 1

    def query_cells(self) -> int:
        """Cells of one batch item's query grid (feature_swap: of its index)."""
        if self.op == "feature_swap":
            return self.query_size[0] * self.query_size[1]
        return _cells(self.query_size, self)

    def key_cells(self) -> int:
        """Cells of one batch item's key grids, over all keys."""
        return sum(_cells((h // self.scale, w // self.scale), self) for h, w in self.key_sizes)


def _cells(size, inputs: Inputs) -> int:
    geo = (inputs.patch_size, inputs.stride, inputs.padding)
    return grid_size(size[0], *geo) * grid_size(size[1], *geo)


def patch_match_inputs(query, keys, patch_size: int, stride: int, padding: int, dtype=None,
                       k: int = 1) -> Inputs:
    """The :class:`Inputs` of a patch match (``dtype``: the one the kernel gets, default the query's)."""
    return Inputs(query.device, "patch_match", dtype or query.dtype, query.shape[0], query.shape[1],
                  (query.shape[-2], query.shape[-1]), tuple((t.shape[-2], t.shape[-1]) for t in keys),
                  patch_size, stride, padding, 1, k)


def feature_swap_inputs(values, index, patch_size: int, stride: int, padding: int, scale: int) -> Inputs:
    """The :class:`Inputs` of a feature swap (and of its backward)."""
    v = values[0]
    return Inputs(v.device, "feature_swap", v.dtype, v.shape[0], v.shape[1],
                  (index.shape[1], index.shape[2]), tuple((t.shape[-2], t.shape[-1]) for t in values),
                  patch_size, stride, padding, scale)


def _as_inputs(inputs: Inputs | torch.device | str) -> Inputs:
    return inputs if isinstance(inputs, Inputs) else Inputs(torch.device(inputs))


def _dtype_reasons(inputs: Inputs, name: str) -> list[str]:
    dtypes = KERNEL_DTYPES.get(inputs.op)
    if inputs.dtype is None or dtypes is None or inputs.dtype in dtypes:
        return []
    return [f"{name} {inputs.op} kernels take {', '.join(str(d).removeprefix('torch.') for d in dtypes)}, "
            f"got {str(inputs.dtype).removeprefix('torch.')}"]


class Backend:
    name = ""

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        """Why this backend cannot run ``inputs`` (empty when it can)."""
        raise NotImplementedError

    def patch_match(self, query, keys, patch_size, stride, padding, precision):
        raise NotImplementedError

    def patch_match_topk(self, query, keys, patch_size, stride, padding, precision, k):
        raise NotImplementedError

    def feature_swap(self, values, index, patch_size, stride, padding, scale, out_h, out_w, reduce):
        raise NotImplementedError

    def feature_swap_backward(self, grad_out, index, value_sizes, patch_size, stride, padding, scale, reduce):
        raise NotImplementedError


class TorchBackend(Backend):
    """Plain torch: the fallback; runs any floating dtype, any size, top-k, on every device."""

    name = "torch"

    def not_supported_reasons(self, inputs):
        return []

    def patch_match(self, *args):
        return torch_backend.patch_match(*args)

    def patch_match_topk(self, *args):
        return torch_backend.patch_match_topk(*args)

    def feature_swap(self, *args):
        return torch_backend.feature_swap(*args)

    def feature_swap_backward(self, *args):
        return torch_backend.feature_swap_backward(*args)


class FusedBackend(Backend):
    """The compiled C++ (``cpu``) or CUDA (``cuda``) kernels: the ``srntt::_*_fused`` ops."""

    def __init__(self, name: str, device_type: str, dispatch_key: str):
        self.name, self.device_type, self.dispatch_key = name, device_type, dispatch_key
        # NB: asked once: the registry does not change while a process runs, and torch.compile
        # can then trace resolve() (it cannot trace the registry query, which returns a bool).
        self.has_kernels = extension.has_kernel("_patch_match_fused", dispatch_key)
        self.has_topk = extension.has_kernel("_patch_match_topk_fused", dispatch_key)

    def not_supported_reasons(self, inputs):
        inputs = _as_inputs(inputs)
        device, reasons = inputs.device, []
        if not extension.LOADED:
            reasons.append(f"extension srntt_core._C failed to load ({extension.LOAD_ERROR})")
        elif not self.has_kernels:
            reasons.append(f"extension built without {self.dispatch_key} kernels")
        if device.type != self.device_type:
            reasons.append(f"needs {self.device_type} tensors, got {device.type}")
        elif device.type == "cuda" and not reasons:
            index = device.index if device.index is not None else torch.cuda.current_device()
            if not extension.cuda_kernel_image(index):
                major, minor = torch.cuda.get_device_capability(index)
                reasons.append(f"extension has no kernel image for compute capability {major}.{minor} "
                               "(rebuild with TORCH_CUDA_ARCH_LIST including it)")
        reasons += _dtype_reasons(inputs, self.name)
        if inputs.k > 1 and not self.has_topk:
            reasons.append(f"{self.name}: no top-k kernel (k={inputs.k})")
        if self.device_type == "cuda":
            reasons += self._cuda_limits(inputs)
        return reasons

    def _cuda_limits(self, inputs: Inputs) -> list[str]:
        if inputs.op == "patch_match" and inputs.batch > GRID_YZ_MAX:
            return [f"cuda: batch {inputs.batch} > {GRID_YZ_MAX} (the match kernels' grid z)"]
        if inputs.op == "feature_swap" and inputs.batch * inputs.key_cells() >= INT32_MAX - 1:
            return [f"cuda: batch x key cells = {inputs.batch * inputs.key_cells()} does not fit the swap "
                    "backward's int32 buckets"]
        return []

    def patch_match(self, *args):
        return tuple(torch.ops.srntt._patch_match_fused(*args))

    def patch_match_topk(self, *args):
        return tuple(torch.ops.srntt._patch_match_topk_fused(*args))

    def feature_swap(self, *args):
        return torch.ops.srntt._feature_swap_fused(*args)

    def feature_swap_backward(self, *args):
        return list(torch.ops.srntt._feature_swap_fused_backward(*args))


class TritonBackend(Backend):
    """Triton kernels from ``srntt_core._triton`` (``kernels/`` in the repository; CUDA, or the CPU
    interpreter)."""

    name = "triton"

    def __init__(self):
        self._launch = None  # (max match candidates, swap channel block), read on first use

    def _kernels(self):
        from .. import _triton

        return _triton

    def _launch_constants(self) -> tuple[int, int]:
        if self._launch is None:
            # NB: the modules, not the package attributes of the same names (the launchers).
            match = sys.modules[f"{__package__.rpartition('.')[0]}._triton.patch_match"]
            swap = sys.modules[f"{__package__.rpartition('.')[0]}._triton.feature_swap"]
            self._launch = (match._MAX_CANDIDATES, swap._BLOCK_C)
        return self._launch

    def not_supported_reasons(self, inputs):
        inputs = _as_inputs(inputs)
        try:
            k = self._kernels()
        except Exception as exc:
            return [f"srntt_core._triton failed to import ({type(exc).__name__}: {exc})"]
        reasons = k.not_supported_reasons(inputs.device)
        if reasons or not inputs.op:
            return reasons
        reasons += _dtype_reasons(inputs, self.name)
        if inputs.k > 1 and not hasattr(k, "patch_match_topk"):
            reasons.append(f"triton: no top-k kernel (k={inputs.k})")
        candidates, channel_block = self._launch_constants()
        if inputs.op == "patch_match" and inputs.query_cells() * candidates >= 1 << 31:
            reasons.append(f"triton: {inputs.query_cells()} query cells per map; the candidate lists take "
                           f"fewer than {(1 << 31) // candidates}")
        if inputs.device.type == "cuda":
            if inputs.batch > GRID_YZ_MAX:
                reasons.append(f"triton: batch {inputs.batch} > {GRID_YZ_MAX} (CUDA grid limit)")
            if inputs.op == "feature_swap" and -(-inputs.channels // channel_block) > GRID_YZ_MAX:
                reasons.append(f"triton: {inputs.channels} channels > {GRID_YZ_MAX * channel_block} "
                               "(CUDA grid limit)")
        return reasons

    def patch_match(self, *args):
        return tuple(self._kernels().patch_match(*args))

    def patch_match_topk(self, *args):
        return tuple(self._kernels().patch_match_topk(*args))

    def feature_swap(self, *args):
        return self._kernels().feature_swap(*args)

    def feature_swap_backward(self, *args):
        return list(self._kernels().feature_swap_backward(*args))


_REGISTRY: dict[str, Backend] = {
    "cpu": FusedBackend("cpu", "cpu", "CPU"),
    "cuda": FusedBackend("cuda", "cuda", "CUDA"),
    "triton": TritonBackend(),
    "torch": TorchBackend(),
}


def get(name: str) -> Backend:
    """The backend object for a concrete name (no checks)."""
    return _REGISTRY[name]


def backend_report(inputs: Inputs | torch.device | str) -> list[str]:
    """``name: ok`` or ``name: <reasons>`` for every backend, on a device or for given inputs."""
    inputs = _as_inputs(inputs)
    out = []
    for name in BACKENDS:
        reasons = _REGISTRY[name].not_supported_reasons(inputs)
        out.append(f"{name}: {'ok' if not reasons else ', '.join(reasons)}")
    return out


def available(inputs: Inputs | torch.device | str) -> list[str]:
    """Names of the backends that can run on a device (or run given inputs)."""
    inputs = _as_inputs(inputs)
    return [n for n in BACKENDS if not _REGISTRY[n].not_supported_reasons(inputs)]


def resolve(backend: str, inputs: Inputs | torch.device) -> str:
    """A concrete backend name for ``backend`` ("auto" or a name) that can run ``inputs`` (or, given
    a device, that can run on it)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
    inputs = _as_inputs(inputs)
    device = inputs.device
    if backend == "auto":
        backend = os.environ.get("SRNTT_BACKEND", "auto") or "auto"
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(
                f"SRNTT_BACKEND: unknown backend {backend!r}; choose from {('auto',) + BACKENDS}")
    if backend == "auto":
        for name in PRIORITY.get(device.type, ("triton", "torch")):
            if not _REGISTRY[name].not_supported_reasons(inputs):
                return name
    elif backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; choose from {('auto',) + BACKENDS}")
    elif not _REGISTRY[backend].not_supported_reasons(inputs):
        return backend
    what = f"{inputs.op} ({inputs.dtype}, batch {inputs.batch}) on {device}" if inputs.op else f"on {device}"
    raise BackendUnavailableError(
        f"backend={backend!r} cannot run {what}:\n  " + "\n  ".join(backend_report(inputs))
    )
