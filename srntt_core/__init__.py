"""srntt-core: exact, O(N)-memory patch matching and texture swapping for reference-based
super-resolution (SRNTT), with C++, CUDA and Triton kernels.

The public API is :mod:`srntt_core.swap`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .ops import extension, library  # noqa: E402,F401  (loads the extension, registers the custom ops)


def build_info() -> str:
    """One line on how this install was built and which backends can run here."""
    import torch

    from .ops.dispatch import backend_report

    ext = "loaded" if extension.LOADED else f"NOT loaded ({extension.LOAD_ERROR})"
    cuda = "with CUDA kernels" if extension.has_kernel("_patch_match_fused", "CUDA") else "CPU kernels only"
    lines = [f"srntt-core {__version__}, torch {torch.__version__}; extension {ext}, {cuda}"]
    if extension.LOADED:
        # The variant of the CPU hot loops chosen for this CPU (SRNTT_CPU_CAPABILITY may lower it).
        lines.append(f"  CPU kernels: {torch.ops.srntt._cpu_capability()}")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        lines.append(f"  backends on {device}: " + "; ".join(backend_report(torch.device(device))))
    return "\n".join(lines)
