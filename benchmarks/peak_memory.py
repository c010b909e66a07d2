"""Peak-memory measurement for the benchmarks and the memory tests (CPU: Linux with glibc; CUDA).

CPU: the peak is the process's resident-set high-water mark (``VmHWM``) during a call minus the
resident set before it; ``/proc/self/clear_refs`` resets the mark, and ``malloc_trim(0)`` first
hands freed heap pages back to the system, so that a call re-using them counts them again.
CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
allocated before.

:func:`fix_allocator` additionally tells glibc to serve every block of 64 KiB or more with its own
mapping and to unmap it when freed (a fixed threshold also turns off glibc's adaptive one). That is
the most faithful setting, but it lasts for the whole process and slows allocation-heavy code, so
only a dedicated measuring process (:func:`run_child`) turns it on.

The tests import this module too (tests/conftest.py puts this folder on ``sys.path``); it lives
here, outside the ``srntt_core`` package, because measuring is the benchmarks' business, not the
library's.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

KERNELS_REASON = ("the compiled CPU kernels are not loaded; the plain-torch fallback works in 64 MiB "
                  "tiles, so the O(N) memory comparison is made against the kernels only")


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@functools.cache
def supported() -> bool:
    """Whether the CPU peak can be measured here (Linux with glibc and a writable clear_refs)."""
    libc = _libc()
    return (sys.platform.startswith("linux") and os.access("/proc/self/clear_refs", os.W_OK)
            and libc is not None and hasattr(libc, "malloc_trim"))


def fix_allocator() -> bool:
    """Process-wide: glibc maps every block >= 64 KiB separately and unmaps it when freed."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 << 10)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 0))


def kernels_available() -> bool:
    """Whether ``backend="auto"`` picks a compiled kernel (not the tiled torch fallback) on the CPU."""
    from srntt_core.ops import dispatch

    return dispatch.resolve("auto", torch.device("cpu")) != "torch"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


class PeakMemory:
    """Bytes a call needs on top of what was resident (allocated, on CUDA) before it:
    ``start()``, the call, ``stop()``. ``stop()`` returns None where the CPU peak cannot be
    measured (see :func:`supported`)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.base: int | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        if not supported():
            self.base = None
            return
        _libc().malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak RSS (Linux >= 4.0)
        self.base = _status_kib("VmRSS") * 1024

    def stop(self) -> int | None:
        if self.base is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            peak = _status_kib("VmHWM") * 1024 - self.base
        self.base = None
        return max(0, peak)


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Bytes of memory ``fn()`` needed above what was in use when it started."""
    probe = PeakMemory(device)
    if probe.device.type == "cpu" and not supported():
        raise RuntimeError("peak_bytes: needs Linux with glibc and a writable /proc/self/clear_refs")
    probe.start()
    result = fn()
    peak = probe.stop()
    del result
    return peak


def run_child(code: str, cwd: str | None = None, timeout: float = 1800) -> dict:
    """Runs ``code`` in a fresh Python (so that allocator settings and peaks stay there); ``code``
    must print one JSON object as its last line, which is returned."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"child process failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
