"""Training pair modes: which reference a training crop is shown with.

A split-image reference (the other half of the same photograph) rarely shares content with
the target crop, so a network trained only on such pairs learns to do without its reference.
The modes below mix in references that do share content, and references that share none:

- ``overlap``: another view of the target's own image around the target crop: random offset
  (the views always overlap), scale in ``[0.8, 1.25]``, a small rotation and a small
  photometric jitter (brightness, contrast, saturation), as Ref-SR methods that learn their
  matching (C2-Matching, MASA) augment their pairs. Pillow does the resampling.
- ``half``: the item's own reference: the other half of the image for split-image folders,
  the listed references for CUFED5-layout folders.
- ``unrelated``: a crop of another image, so that the network also learns to ignore a
  reference that does not match (the swap's weight maps are its cue).

A mix is written ``"overlap:0.5,half:0.3,unrelated:0.2"`` (weights >= 0, normalized; modes
left out get 0). All random draws come from the per-sample ``torch.Generator``, so a mix is
as deterministic per global sample as the crops are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance

PAIR_MODES = ("overlap", "half", "unrelated")
DEFAULT_PAIR_MIX = "half:1"


def parse_pair_mix(spec: str) -> dict[str, float]:
    """``"mode:weight,..."`` -> normalized weights over :data:`PAIR_MODES` (clear errors naming
    ``pair_mix``)."""
    if not isinstance(spec, str):
        raise TypeError(f"pair_mix: expected a string like 'overlap:0.5,half:0.5', got {type(spec).__name__}")
    weights = dict.fromkeys(PAIR_MODES, 0.0)
    seen = set()
    for part in spec.split(","):
        name, sep, value = part.strip().partition(":")
        name = name.strip()
        if not sep or name not in PAIR_MODES:
            raise ValueError(f"pair_mix: expected 'mode:weight' entries with modes {', '.join(PAIR_MODES)}, "
                             f"got {part.strip()!r} in {spec!r}")
        if name in seen:
            raise ValueError(f"pair_mix: mode {name!r} is given twice in {spec!r}")
        seen.add(name)
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"pair_mix: weight of {name!r} is not a number: {value.strip()!r}") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"pair_mix: weight of {name!r} must be a finite number >= 0, "
                             f"got {value.strip()!r}")
        weights[name] = w
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"pair_mix: the weights sum to 0 in {spec!r}; give at least one positive weight")
    return {k: v / total for k, v in weights.items()}


def choose_mode(mix: dict[str, float], g: torch.Generator) -> str:
    """One mode of ``mix``; a mix with a single mode draws nothing from ``g``."""
    used = [k for k in PAIR_MODES if mix[k] > 0]
    if len(used) == 1:
        return used[0]
    u = float(torch.rand((), generator=g))
    acc = 0.0
    for k in used:
        acc += mix[k]
        if u < acc:
            return k
    return used[-1]


@dataclass(frozen=True)
class OverlapParams:
    """Ranges of the overlap view: ``scale`` is the zoom of the view relative to the target
    (source side = ref_crop / scale), ``degrees`` the largest rotation, ``jitter`` the largest
    relative change of brightness, contrast and saturation."""

    scale: tuple[float, float] = (0.8, 1.25)
    degrees: float = 4.0
    jitter: float = 0.1


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def overlap_view(img: torch.Tensor, box: tuple[int, int, int], size: int, g: torch.Generator,
                 params: OverlapParams = OverlapParams()) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """A ``size`` x ``size`` view of ``img`` (uint8 (3, H, W)) that overlaps the crop
    ``box = (y, x, side)``; returns ``(view uint8 (3, size, size), (cy, cx, source side))``.

    The view's centre is the crop's centre moved by at most a quarter of (view side + crop
    side) per axis, so the two always share at least that much in each axis; the view is then
    moved inside the image (which keeps the overlap). Its source square is cut with a margin
    for the rotation, rotated about its centre, cut and resized to ``size`` (Pillow bicubic,
    antialiased when shrinking), then jittered.
    """
    y, x, side = box
    h, w = img.shape[-2:]
    scale = _uniform(g, *params.scale)
    angle = _uniform(g, -params.degrees, params.degrees)
    rad = math.radians(abs(angle))
    spread = math.cos(rad) + math.sin(rad)  # side of the square that holds the rotated view
    src = min(size / scale, min(h, w) / spread)
    outer = src * spread
    reach = (src + side) / 4
    cy = y + side / 2 + _uniform(g, -reach, reach)
    cx = x + side / 2 + _uniform(g, -reach, reach)
    cy = min(max(cy, outer / 2), h - outer / 2)
    cx = min(max(cx, outer / 2), w - outer / 2)
    factors = [_uniform(g, 1 - params.jitter, 1 + params.jitter) for _ in range(3)]

    x0, y0 = math.floor(cx - outer / 2), math.floor(cy - outer / 2)
    x1, y1 = min(math.ceil(cx + outer / 2), w), min(math.ceil(cy + outer / 2), h)
    pil = Image.fromarray(img[:, y0:y1, x0:x1].permute(1, 2, 0).numpy())
    local = (cx - x0, cy - y0)
    pil = pil.rotate(angle, resample=Image.BICUBIC, center=local)
    half = src / 2
    pil = pil.resize((size, size), Image.BICUBIC,
                     box=(local[0] - half, local[1] - half, local[0] + half, local[1] + half))
    for enhancer, f in zip((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors,
                           strict=True):
        pil = enhancer(pil).enhance(f)
    view = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous()
    return view, (cy, cx, src)
