"""x4 reference-based super-resolution with a trained SRNTT generator.

- Any size and aspect: the LR image is padded (edge replication) to a multiple of 4 (and
  at least 12 px, one relu3_1 patch of the reference side), and the output cropped back.
- Several references: their patches form one pool (one global argmax, as SRNTT matches several references).
- Large inputs are cut into overlapping LR tiles; outputs are blended with linear ramps in
  the overlaps, so memory is bounded by the tile size (plus the reference features, which
  are computed once: a :class:`ReferenceBank`, which may also be passed in to share them
  across inputs).
- The inference path does the least work: the generator runs as a BatchNorm-folded copy
  (:func:`srntt_core.models.fuse.inference_copy`), it and the VGG passes in channels-last
  layout (oneDNN's direct path on CPU, ~25% faster than NCHW here); ``fast=False`` runs the
  model as given (the straightforward path, which the fast one matches to 1e-4 per pixel).
- Errors: missing / corrupt images raise from :mod:`srntt_core.models.data`; a checkpoint that is
  refused or does not fit the network raises :class:`srntt_core.models.checkpoint.CheckpointError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, load_generator
from .srntt import SRNTT

__all__ = ["CheckpointError", "ReferenceBank", "check_tiling", "load_model", "no_reference",
           "prepare_reference", "resolve_device", "super_resolve"]

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
BUNDLED_CHECKPOINT = CHECKPOINT_DIR / "srntt_l2.pt"
LEVELS = {"relu3_1": 1, "relu2_1": 2, "relu1_1": 4}
MIN_LR = 3  # one 3x3 relu3_1 patch


# ---------------------------------------------------------------------------------------------
# checkpoints and devices

def load_model(path: str | os.PathLike = "bundled", device: str | torch.device = "cpu") -> SRNTT:
    """Load an SRNTT generator (fp16 checkpoints are cast to float32) in eval mode.

    The file is read and checked by :mod:`srntt_core.models.checkpoint` (``weights_only`` loading,
    configuration, key / shape / finiteness checks) before the network is built.
    """
    path = BUNDLED_CHECKPOINT if str(path) == "bundled" else Path(path)
    if not path.is_file():
        bundled = path == BUNDLED_CHECKPOINT
        hint = " (the bundled checkpoint is missing: reinstall srntt-core)" if bundled else ""
        raise FileNotFoundError(f"checkpoint not found: {path}{hint}")
    return load_generator(path).to(device).eval()


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ValueError otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r} is not supported; expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} requested but only {torch.cuda.device_count()} "
                             "CUDA device(s) are present")
    return dev


# ---------------------------------------------------------------------------------------------
# swapping with reference features computed once

def _bicubic(x: torch.Tensor, factor: float) -> torch.Tensor:
    # same resampling as srntt_core.swap.texture_swap
    return F.interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False,
                         antialias=factor < 1).clamp(0, 1)


class ReferenceBank(nn.Module):
    """VGG features of the references, computed once: keys (relu3_1 of Ref↓↑) and values
    (relu3_1/2_1/1_1 of Ref). ``swap(lr)`` then equals ``srntt_core.swap.texture_swap(lr, refs)``.

    ``channels_last``: run the VGG passes in channels-last layout (oneDNN's faster path on CPU);
    the stored features are contiguous either way, as the swap kernels read them.
    """

    def __init__(self, refs: Sequence[torch.Tensor], extractor: nn.Module | None = None,
                 backend: str = "auto", channels_last: bool = False):
        super().__init__()
        from .. import swap

        self.backend = backend
        self.channels_last = channels_last
        self.extractor = extractor if extractor is not None else swap.default_extractor()
        self.keys: list[torch.Tensor] = []
        self.values: dict[str, list[torch.Tensor]] = {k: [] for k in LEVELS}
        with torch.no_grad():
            for r in refs:
                r = r if r.dim() == 4 else r[None]
                self.keys.append(self._features(_bicubic(_bicubic(r, 0.25), 4))["relu3_1"].contiguous())
                feats = self._features(r)
                for k in LEVELS:
                    self.values[k].append(feats[k].contiguous())

    def _features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.extractor(x)

    @torch.no_grad()
    def swap(self, lr: torch.Tensor) -> dict[str, torch.Tensor]:
        from .. import swap

        b = lr.shape[0]
        query = self._features(_bicubic(lr, 4))["relu3_1"]
        keys = [k.expand(b, -1, -1, -1) for k in self.keys]
        match = swap.patch_match(query, keys, backend=self.backend)
        h, w = lr.shape[-2:]
        return {
            k: swap.feature_swap([v.expand(b, -1, -1, -1) for v in self.values[k]], match.index, scale=s,
                                 out_size=(h * s, w * s), backend=self.backend)
            for k, s in LEVELS.items()
        }


def prepare_reference(ref: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (1, 3, H', W'): cropped to a multiple of 4, at least 12 px (padded)."""
    if ref.dim() == 3:
        ref = ref[None]
    if ref.dim() != 4 or ref.shape[:2] != (1, 3):
        raise ValueError(f"reference: expected (3, H, W) RGB, got shape {tuple(ref.shape)}")
    h, w = ref.shape[-2:]
    ph, pw = max(12 - h, 0), max(12 - w, 0)
    if ph or pw:
        ref = F.pad(ref, (0, pw, 0, ph), mode="replicate")
    h, w = ref.shape[-2:]
    return ref[..., : h - h % 4, : w - w % 4].contiguous()


# ---------------------------------------------------------------------------------------------
# super-resolution

def _pad_lr(lr: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    h, w = lr.shape[-2:]
    hp = max(-(-h // 4) * 4, 12)
    wp = max(-(-w // 4) * 4, 12)
    if (hp, wp) != (h, w):
        lr = F.pad(lr, (0, wp - w, 0, hp - h), mode="replicate")
    return lr, h, w


def _ramp(n: int, overlap: int, lo_edge: bool, hi_edge: bool) -> torch.Tensor:
    """1-D blending weights: linear ramps over ``overlap`` at inner borders, 1 elsewhere."""
    w = torch.ones(n, dtype=torch.float64)
    if overlap > 0:
        r = (torch.arange(overlap, dtype=torch.float64) + 0.5) / overlap
        if not lo_edge:
            w[:overlap] = torch.minimum(w[:overlap], r)
        if not hi_edge:
            w[-overlap:] = torch.minimum(w[-overlap:], r.flip(0))
    return w


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(starts))


def check_tiling(tile: int | None, overlap: int) -> None:
    """``tile``: None (whole image) or >= 12 LR pixels; ``overlap`` in [0, tile/2)."""
    if tile is not None and tile < 12:
        raise ValueError(f"tile: must be >= 12 LR pixels (or none), got {tile}")
    if tile is not None and not 0 <= overlap < tile // 2:
        raise ValueError(f"overlap: must be in [0, tile/2), got {overlap} for tile {tile}")


@torch.no_grad()
def super_resolve(
    model: SRNTT,
    lr: torch.Tensor,
    refs: Sequence[torch.Tensor] | torch.Tensor | ReferenceBank,
    *,
    backend: str = "auto",
    tile: int | None = 128,
    overlap: int = 16,
    extractor: nn.Module | None = None,
    progress: Callable[[int, int], None] | None = None,
    fast: bool = True,
) -> torch.Tensor:
    """x4 SR of ``lr`` (3, h, w) in [0, 1] with reference images ``refs`` (each (3, H, W) in [0, 1]),
    or a :class:`ReferenceBank` of them (features computed once for several inputs).

    Returns (3, 4h, 4w) in [0, 1] on the model's device. ``tile``: LR tile size (None: whole
    image at once); tiles overlap by ``overlap`` LR pixels and are blended linearly.
    ``progress(done, total)`` is called after each tile. ``refs`` may be a :class:`ReferenceBank`
    built once for several inputs sharing references (its backend and extractor are then used).
    ``fast``: run a BatchNorm-folded copy of ``model`` (a model without BatchNorm runs as is) and
    everything in channels-last layout; False: ``model`` itself, NCHW (the straightforward path).
    """
    if lr.dim() == 4:
        if lr.shape[0] != 1:
            raise ValueError(f"lr: one image at a time, got batch of {lr.shape[0]}")
        lr = lr[0]
    if lr.dim() != 3 or lr.shape[0] != 3:
        raise ValueError(f"lr: expected (3, h, w) RGB, got shape {tuple(lr.shape)}")
    bank = refs if isinstance(refs, ReferenceBank) else None
    if isinstance(refs, torch.Tensor):
        refs = [refs] if refs.dim() == 3 else list(refs)
    if bank is None and not refs:
        raise ValueError("refs: give at least one reference image (or the LR upsampled, for no reference)")
    check_tiling(tile, overlap)
    device = next(model.parameters()).device
    lr = lr.to(device, torch.float32)
    if bank is None:
        if extractor is None:
            from ..swap import default_extractor

            extractor = default_extractor().to(device)
        bank = ReferenceBank([prepare_reference(r.to(device, torch.float32)) for r in refs], extractor,
                             backend, channels_last=fast)
    if fast:
        from .fuse import has_batchnorm, inference_copy

        if has_batchnorm(model):
            model = inference_copy(model, channels_last=True)
    layout = torch.channels_last if fast else torch.contiguous_format
    h, w = lr.shape[-2:]

    def run(x: torch.Tensor) -> torch.Tensor:
        xp, hh, ww = _pad_lr(x[None])
        maps = {k: v.contiguous(memory_format=layout) for k, v in bank.swap(xp).items()}
        sr = model((xp * 2 - 1).contiguous(memory_format=layout), maps)
        return ((sr + 1) / 2).clamp(0, 1)[0, :, : 4 * hh, : 4 * ww]

    if tile is None or (h <= tile and w <= tile):
        out = run(lr)
        if progress:
            progress(1, 1)
        return out
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    out = torch.zeros(3, 4 * h, 4 * w, dtype=torch.float64, device=device)
    weight = torch.zeros(1, 4 * h, 4 * w, dtype=torch.float64, device=device)
    total, done = len(ys) * len(xs), 0
    for y in ys:
        for x in xs:
            th, tw = min(tile, h - y), min(tile, w - x)
            sr = run(lr[:, y:y + th, x:x + tw]).double()
            wy = _ramp(4 * th, 4 * overlap, y == 0, y + th >= h).to(device)
            wx = _ramp(4 * tw, 4 * overlap, x == 0, x + tw >= w).to(device)
            wt = (wy[:, None] * wx[None, :])[None]
            out[:, 4 * y:4 * (y + th), 4 * x:4 * (x + tw)] += sr * wt
            weight[:, 4 * y:4 * (y + th), 4 * x:4 * (x + tw)] += wt
            done += 1
            if progress:
                progress(done, total)
    return (out / weight).float()


def no_reference(lr: torch.Tensor) -> torch.Tensor:
    """SRNTT's no-reference setting: the LR upsampled (PIL bicubic) is the reference."""
    from .data import bicubic_up

    return bicubic_up(lr)
