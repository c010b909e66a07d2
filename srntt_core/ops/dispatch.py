"""Backend selection (the xformers pattern).

Each backend says why it cannot run on a device (``not_supported_reasons``); ``auto`` takes the
first that can in a per-device priority order, ``SRNTT_BACKEND`` overrides ``auto``, and asking for
one that cannot run raises :class:`BackendUnavailableError` listing every backend's reasons.
"""

from __future__ import annotations

import os

import torch

from . import extension, torch_backend

BACKENDS = ("cpu", "cuda", "triton", "torch")
PRIORITY = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


class BackendUnavailableError(RuntimeError):
    """The requested backend (or every backend, for ``auto``) cannot run these inputs."""


class Backend:
    name = ""

    def not_supported_reasons(self, device: torch.device) -> list[str]:
        raise NotImplementedError

    def patch_match(self, query, keys, patch_size, stride, padding, precision):
        raise NotImplementedError

    def feature_swap(self, values, index, patch_size, stride, padding, scale, out_h, out_w, reduce):
        raise NotImplementedError

    def feature_swap_backward(self, grad, index, value_sizes, patch_size, stride, padding, scale, reduce):
        raise NotImplementedError


class TorchBackend(Backend):
    """Plain torch: the oracle and the fallback; runs everywhere."""

    name = "torch"

    def not_supported_reasons(self, device):
        return []

    def patch_match(self, *args):
        return torch_backend.patch_match(*args)

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

    def not_supported_reasons(self, device):
        reasons = []
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
        return reasons

    def patch_match(self, *args):
        return tuple(torch.ops.srntt._patch_match_fused(*args))

    def feature_swap(self, *args):
        return torch.ops.srntt._feature_swap_fused(*args)

    def feature_swap_backward(self, *args):
        return list(torch.ops.srntt._feature_swap_fused_backward(*args))


class TritonBackend(Backend):
    """Triton kernels from ``srntt_core._triton`` (``kernels/`` in the repository; CUDA, or the CPU
    interpreter)."""

    name = "triton"

    def _kernels(self):
        from .. import _triton

        return _triton

    def not_supported_reasons(self, device):
        try:
            k = self._kernels()
        except Exception as exc:
            return [f"srntt_core._triton failed to import ({type(exc).__name__}: {exc})"]
        return k.not_supported_reasons(device)

    def patch_match(self, *args):
        return tuple(self._kernels().patch_match(*args))

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


def backend_report(device: torch.device) -> list[str]:
    """``name: ok`` or ``name: <reasons>`` for every backend on ``device``."""
    out = []
    for name in BACKENDS:
        reasons = _REGISTRY[name].not_supported_reasons(device)
        out.append(f"{name}: {'ok' if not reasons else ', '.join(reasons)}")
    return out


def available(device: torch.device | str) -> list[str]:
    """Names of the backends that can run on ``device``."""
    device = torch.device(device)
    return [n for n in BACKENDS if not _REGISTRY[n].not_supported_reasons(device)]


def resolve(backend: str, device: torch.device) -> str:
    """A concrete backend name for ``backend`` ("auto" or a name) on ``device``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("SRNTT_BACKEND", "auto") or "auto"
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(
                f"SRNTT_BACKEND: unknown backend {backend!r}; choose from {('auto',) + BACKENDS}")
    if backend == "auto":
        for name in PRIORITY.get(device.type, ("triton", "torch")):
            if not _REGISTRY[name].not_supported_reasons(device):
                return name
    elif backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; choose from {('auto',) + BACKENDS}")
    elif not _REGISTRY[backend].not_supported_reasons(device):
        return backend
    raise BackendUnavailableError(
        f"backend={backend!r} cannot run on {device}:\n  " + "\n  ".join(backend_report(device))
    )
