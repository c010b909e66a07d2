"""A filesystem-safe name for the machine benchmarks run on.

``machine_name()`` is the CUDA device name when a GPU is visible (``NVIDIA-H100-80GB-HBM3``), else
``cpu-<short CPU model>-<n>c`` (``cpu-AMD-EPYC-2c``), n being the cores this process may use.
``python -m srntt_core.cli.machine`` prints it; ``make bench`` files its results under
``benchmarks/results/<name>/``.
"""

from __future__ import annotations

import os
import platform
import re

# Marketing words that make CPU model strings long without telling two machines apart.
_NOISE = re.compile(r"\((R|TM|tm|r)\)|\bCPU\b|\bProcessor\b|\b\d+-Core\b|@.*$|\bwith\b.*$")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-.") or "unknown"


def cpu_model() -> str:
    """The CPU model string from /proc/cpuinfo (Linux) or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_name(device: str | None = None) -> str:
    """``<GPU name>`` if CUDA is available (or ``device`` is a CUDA device), else ``cpu-<model>-<n>c``."""
    import torch

    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda:
        index = torch.device(device).index if device is not None else None
        return _safe(torch.cuda.get_device_name(index or 0))
    return f"cpu-{_safe(_NOISE.sub(' ', cpu_model()))}-{cpu_cores()}c"


if __name__ == "__main__":
    print(machine_name())
