"""Peak-memory measurement for the compat tests and benchmarks (Linux, glibc; CPU tensors).

The peak is the process's resident-set high-water mark (``VmHWM``) during a call minus the resident
set before it; ``/proc/self/clear_refs`` resets the mark, and ``malloc_trim(0)`` first hands freed heap
pages back to the system, so that a call re-using them counts them again.

:func:`fix_allocator` additionally tells glibc to serve every block of 64 KiB or more with its own
mapping and to unmap it when freed (a fixed threshold also turns off glibc's adaptive one). That is
the most faithful setting, but it lasts for the whole process and slows allocation-heavy code, so
only a dedicated measuring process (the benchmark's child) turns it on; the tests do not.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from collections.abc import Callable

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_configured: bool | None = None

KERNELS_REASON = ("the compiled CPU kernels are not loaded; the plain-torch fallback works in 64 MiB "
                  "tiles, so the O(N) memory comparison is made against the kernels only")


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _configure() -> bool:
    global _configured
    if _configured is None:
        libc = _libc()
        _configured = (sys.platform.startswith("linux") and os.access("/proc/self/clear_refs", os.W_OK)
                       and libc is not None and hasattr(libc, "malloc_trim"))
    return _configured


def fix_allocator() -> bool:
    """Process-wide: glibc maps every block >= 64 KiB separately and unmaps it when freed."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 << 10)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 0))


def supported() -> bool:
    """Whether :func:`peak_bytes` can measure here (Linux with glibc and a writable clear_refs)."""
    return _configure()


def kernels_available() -> bool:
    """Whether ``backend="auto"`` picks a compiled kernel (not the tiled torch fallback) on the CPU."""
    import torch

    from ..ops import dispatch

    return dispatch.resolve("auto", torch.device("cpu")) != "torch"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_bytes(fn: Callable[[], object]) -> int:
    """Bytes of resident memory ``fn()`` needed above what was resident when it started."""
    if not _configure():
        raise RuntimeError("peak_bytes: needs Linux with glibc and a writable /proc/self/clear_refs")
    _libc().malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return (peak - before) * 1024


def run_child(code: str, cwd: str | None = None, timeout: float = 1800) -> dict:
    """Runs ``code`` in a fresh Python (so that :func:`peak_bytes`'s allocator settings stay there);
    ``code`` must print one JSON object as its last line, which is returned."""
    import json
    import subprocess

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"child process failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
