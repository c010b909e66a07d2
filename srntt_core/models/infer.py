"""x4 reference-based super-resolution with a trained SRNTT generator.

- Any size and aspect: the LR image is padded (edge replication) to a multiple of 4 (and
  at least :data:`MIN_SIDE` px, one relu3_1 patch of the reference side), and the output cropped back.
- Several references: their patches form one pool (one global argmax, as SRNTT matches several references).
- Large inputs are cut into overlapping LR tiles; outputs are blended with linear ramps in
  the overlaps, so memory is bounded by the tile size (plus the reference features, which
  are computed once: a :class:`ReferenceBank`, which may also be passed in to share them
  across inputs).
- The inference path does the least work: the generator runs as a BatchNorm-folded copy, built
  once per model and rebuilt when its weights change (:func:`srntt_core.models.fuse.fast_generator`),
  whose convolutions take in the ReLU, residual add and channel concatenation around them on the
  CPU, as the VGG passes' conv + ReLU; everything runs in channels-last layout, and on an AVX2 CPU
  the 3x3 convolutions are Winograd F(4x4, 3x3) (:mod:`srntt_core.ops.winograd`: a quarter of the
  multiplies), the others oneDNN's fused direct ones. ``fast=False`` runs the model as given with
  plain torch ops, NCHW (the straightforward path, which the fast one matches to 1e-4 per pixel).
  Opt-in: ``compile=True`` (inductor; CUDA graphs on a GPU) and ``precision="medium"`` (bfloat16
  networks, bf16 match).
- Errors: missing / corrupt images raise from :mod:`srntt_core.models.data`; a checkpoint that is
  refused or does not fit the network raises :class:`srntt_core.models.checkpoint.CheckpointError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import swap
from ..ops.library import PRECISIONS, check_choice
from .checkpoint import CheckpointError, load_generator
from .srntt import SRNTT

__all__ = ["CheckpointError", "ReferenceBank", "check_tiling", "load_model", "no_reference",
           "prepare_reference", "resolve_device", "super_resolve"]

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
BUNDLED_CHECKPOINT = CHECKPOINT_DIR / "srntt_l2.pt"
# The generator's output scale; NB: the swap stage lines its maps up with the LR only because it
# equals swap.UPSCALE (relu1_1's scale over relu3_1).
SCALE = SRNTT.scale
# The smallest side of a reference, an LR image and an LR tile: a reference's relu3_1 map
# (1/swap.UPSCALE of it) then holds one 3x3 patch.
MIN_SIDE = 3 * swap.UPSCALE


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

class ReferenceBank(nn.Module):
    """:func:`srntt_core.swap.reference_features` of the references, computed once (keys: relu3_1 of
    Ref↓↑; values: relu3_1/2_1/1_1 of Ref) and kept in float32. ``swap(lr)`` then equals
    ``srntt_core.swap.texture_swap(lr, refs).maps``, for any number of inputs and tiles.

    ``channels_last``: run the VGG passes in channels-last layout (oneDNN's faster path on CPU).
    NB: the key patches' norms are not kept: the kernels take none precomputed and compute them in
    every match, a key-side pass measured at ~6% of the match at the default tile size
    (docs/benchmarks.md, "End-to-end super-resolution").
    """

    def __init__(self, refs: Sequence[torch.Tensor], extractor: nn.Module | None = None,
                 backend: str = "auto", channels_last: bool = False):
        super().__init__()
        self.backend = backend
        self.channels_last = channels_last
        self.extractor = extractor if extractor is not None else swap.default_extractor()
        with torch.no_grad():
            feats = [swap.reference_features(r if r.dim() == 4 else r[None], self.extractor,
                                             channels_last=channels_last) for r in refs]
        self.keys = [f.key.float() for f in feats]
        self.values = [{layer: v.float() for layer, v in f.values.items()} for f in feats]

    @torch.no_grad()
    def swap(self, lr: torch.Tensor, precision: str = "highest") -> dict[str, torch.Tensor]:
        b = lr.shape[0]
        query = swap.query_features(lr, self.extractor, channels_last=self.channels_last)
        match = swap.patch_match(query, [k.expand(b, -1, -1, -1) for k in self.keys], backend=self.backend,
                                 precision=precision)
        values = [{layer: v.expand(b, -1, -1, -1) for layer, v in vs.items()} for vs in self.values]
        return swap.swap_levels(values, match.index, tuple(lr.shape[-2:]), backend=self.backend)


def prepare_reference(ref: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (1, 3, H', W'): cropped to a multiple of 4, at least MIN_SIDE px (padded)."""
    if ref.dim() == 3:
        ref = ref[None]
    if ref.dim() != 4 or ref.shape[:2] != (1, 3):
        raise ValueError(f"reference: expected (3, H, W) RGB, got shape {tuple(ref.shape)}")
    h, w = ref.shape[-2:]
    ph, pw = max(MIN_SIDE - h, 0), max(MIN_SIDE - w, 0)
    if ph or pw:
        ref = F.pad(ref, (0, pw, 0, ph), mode="replicate")
    h, w = ref.shape[-2:]
    return ref[..., : h - h % swap.UPSCALE, : w - w % swap.UPSCALE].contiguous()


# ---------------------------------------------------------------------------------------------
# super-resolution

def _pad_lr(lr: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    h, w = lr.shape[-2:]
    hp = max(-(-h // SCALE) * SCALE, MIN_SIDE)
    wp = max(-(-w // SCALE) * SCALE, MIN_SIDE)
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
    """``tile``: None (whole image) or >= MIN_SIDE LR pixels; ``overlap`` in [0, tile/2)."""
    if tile is not None and tile < MIN_SIDE:
        raise ValueError(f"tile: must be >= {MIN_SIDE} LR pixels (or none), got {tile}")
    if tile is not None and not 0 <= overlap < tile // 2:
        raise ValueError(f"overlap: must be in [0, tile/2), got {overlap} for tile {tile}")


def _check_lr(lr: torch.Tensor) -> torch.Tensor:
    if lr.dim() == 4:
        if lr.shape[0] != 1:
            raise ValueError(f"lr: one image at a time, got batch of {lr.shape[0]}")
        lr = lr[0]
    if lr.dim() != 3 or lr.shape[0] != 3:
        raise ValueError(f"lr: expected (3, h, w) RGB, got shape {tuple(lr.shape)}")
    return lr


def _generator(model: SRNTT, fast: bool, compile: bool, device: torch.device) -> nn.Module:
    if compile and not fast:
        raise ValueError("compile: compiles the fast path's generator; it needs fast=True")
    if not fast:
        return model
    from .fuse import fast_generator

    # NB: on a GPU, "reduce-overhead" replays CUDA graphs, one per tile shape; their outputs are
    # overwritten by the next replay, so every output is copied (the blend or the clamp) before it.
    mode = ("reduce-overhead" if device.type == "cuda" else "default") if compile else None
    return fast_generator(model, channels_last=True, compile_mode=mode)


def _networks_precision(device: torch.device, precision: str):
    """The networks' precision: "medium" runs the VGG passes and the generator under bfloat16
    autocast; "highest" and "high" run them in float32 (torch's defaults; the match precision
    differs)."""
    if precision == "medium":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _blend_tiles(run: Callable[[torch.Tensor], torch.Tensor], lr: torch.Tensor, tile: int, overlap: int,
                 progress: Callable[[int, int], None] | None) -> torch.Tensor:
    h, w = lr.shape[-2:]
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    out = torch.zeros(3, SCALE * h, SCALE * w, dtype=torch.float64, device=lr.device)
    weight = torch.zeros(1, SCALE * h, SCALE * w, dtype=torch.float64, device=lr.device)
    total, done = len(ys) * len(xs), 0
    for y in ys:
        for x in xs:
            th, tw = min(tile, h - y), min(tile, w - x)
            sr = run(lr[:, y:y + th, x:x + tw]).double()
            wy = _ramp(SCALE * th, SCALE * overlap, y == 0, y + th >= h).to(lr.device)
            wx = _ramp(SCALE * tw, SCALE * overlap, x == 0, x + tw >= w).to(lr.device)
            wt = (wy[:, None] * wx[None, :])[None]
            rows, cols = slice(SCALE * y, SCALE * (y + th)), slice(SCALE * x, SCALE * (x + tw))
            out[:, rows, cols] += sr * wt
            weight[:, rows, cols] += wt
            done += 1
            if progress:
                progress(done, total)
    return (out / weight).float()


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
    compile: bool = False,
    precision: str = "highest",
) -> torch.Tensor:
    """x4 SR of ``lr`` (3, h, w) in [0, 1] with reference images ``refs`` (each (3, H, W) in [0, 1]),
    or a :class:`ReferenceBank` of them (features computed once for several inputs).

    Returns (3, 4h, 4w) in [0, 1] on the model's device. ``tile``: LR tile size (None: whole
    image at once); tiles overlap by ``overlap`` LR pixels and are blended linearly.
    ``progress(done, total)`` is called after each tile. ``refs`` may be a :class:`ReferenceBank`
    built once for several inputs sharing references (its backend and extractor are then used).
    ``fast``: run a BatchNorm-folded copy of ``model`` (built once per model, rebuilt when its
    weights change; a model without BatchNorm runs as is), Winograd / fused convolutions and everything
    in channels-last layout; False: ``model`` itself, NCHW, plain torch ops (the straightforward path).
    ``compile``: run that copy compiled by ``torch.compile`` (inductor; CUDA graphs on a GPU), kept
    per model and tile shape: the first call of each shape pays the compile time.
    ``precision``: the match's (:func:`srntt_core.swap.patch_match`); "medium" also runs the
    networks under bfloat16 autocast (NB: the match is then exact for the bf16 features, which
    differ from the float32 ones, so the output is not within 1e-4 of the float32 path).
    """
    lr = _check_lr(lr)
    precision = check_choice("precision", precision, PRECISIONS)
    bank = refs if isinstance(refs, ReferenceBank) else None
    if isinstance(refs, torch.Tensor):
        refs = [refs] if refs.dim() == 3 else list(refs)
    if bank is None and not refs:
        raise ValueError("refs: give at least one reference image (or the LR upsampled, for no reference)")
    check_tiling(tile, overlap)
    device = next(model.parameters()).device
    generator = _generator(model, fast, compile, device)
    lr = lr.to(device, torch.float32)
    layout = torch.channels_last if fast else torch.contiguous_format
    from .fuse import plain_ops

    with _networks_precision(device, precision), (contextlib.nullcontext() if fast else plain_ops()):
        if bank is None:
            extractor = extractor if extractor is not None else swap.default_extractor().to(device)
            bank = ReferenceBank([prepare_reference(r.to(device, torch.float32)) for r in refs], extractor,
                                 backend, channels_last=fast)

        def run(x: torch.Tensor) -> torch.Tensor:
            xp, hh, ww = _pad_lr(x[None])
            maps = {k: v.contiguous(memory_format=layout) for k, v in bank.swap(xp, precision).items()}
            sr = generator((xp * 2 - 1).contiguous(memory_format=layout), maps).float()
            return ((sr + 1) / 2).clamp(0, 1)[0, :, : SCALE * hh, : SCALE * ww]

        h, w = lr.shape[-2:]
        if tile is None or (h <= tile and w <= tile):
            out = run(lr)
            if progress:
                progress(1, 1)
            return out
        return _blend_tiles(run, lr, tile, overlap, progress)


def no_reference(lr: torch.Tensor) -> torch.Tensor:
    """SRNTT's no-reference setting: the LR upsampled (PIL bicubic) is the reference."""
    from .data import bicubic_up

    return bicubic_up(lr)
