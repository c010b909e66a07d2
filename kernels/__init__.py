"""Triton kernels of srntt-core (optional: importing this package never fails).

``AVAILABLE`` says whether the kernels were imported; ``UNAVAILABLE_REASON`` says why not.
The launchers are the ops ``srntt::_patch_match_triton``, ``srntt::_feature_swap_triton`` and
``srntt::_feature_swap_triton_backward`` (docs/DESIGN.md), callable directly:

    patch_match(query, keys, patch_size, stride, padding, precision) -> (index, score)
    patch_match_topk(query, keys, patch_size, stride, padding, precision, k) -> (index, score), (..., k) each
    feature_swap(values, index, patch_size, stride, padding, scale, out_h, out_w, reduce) -> Tensor
    feature_swap_backward(grad_out, index, value_sizes, patch_size, stride, padding, scale, reduce)
        -> list[Tensor]

Without a GPU the kernels run only under the Triton interpreter, which must be enabled
(``TRITON_INTERPRET=1``) before this package is imported.
"""

import os

AVAILABLE = False
UNAVAILABLE_REASON = ""
__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "not_supported_reasons"]

try:
    import triton  # noqa: F401
except ImportError as exc:
    UNAVAILABLE_REASON = f"triton: not installed ({exc})"
else:
    try:
        from .feature_swap import feature_swap, feature_swap_backward
        from .patch_match import patch_match, patch_match_topk
    except Exception as exc:  # a broken install must not break `import srntt_core`; keep the real error
        UNAVAILABLE_REASON = f"triton: kernels failed to import: {type(exc).__name__}: {exc}"
    else:
        AVAILABLE = True
        __all__ += ["patch_match", "patch_match_topk", "feature_swap", "feature_swap_backward"]


def not_supported_reasons(device) -> list[str]:
    """Why the Triton kernels cannot run on ``device`` (empty when they can)."""
    import torch

    if not AVAILABLE:
        return [UNAVAILABLE_REASON]
    device = torch.device(device)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        return (
            ["triton: TRITON_INTERPRET=1 runs kernels on the host, not on CUDA tensors"]
            if interpreted
            else []
        )
    if device.type == "cpu" and interpreted:
        return []
    return [f"triton: no kernels for {device.type} tensors (CUDA, or the CPU under TRITON_INTERPRET=1)"]
