"""The evaluation table (docs/CONTRACT.md §10): bicubic, split-image (or CUFED5) reference, none,
oracle, reference ablation.

For every target HR (mod-cropped to 4): LR = PIL bicubic x1/4; the bicubic row is PIL bicubic
x4 of the LR. SRNTT runs with (a) the real reference(s) (the other half of the image in the
split-image protocol, or CUFED5's references), (b) the target's own LR↑ as reference (no
reference, SRNTT's SISR setting), (c) the target's HR (oracle upper bound), (d) swapped maps
set to zero (reference ablation: the network with no texture from any reference; NB: zero maps
are outside what the network was trained on, so this row bounds, rather than measures, what
the network leaves to its content branch). Outputs are rounded to 8 bits, then PSNR/SSIM are
measured on Y (BT.601) with a 4-pixel shave. The reference's effect is reported per image and
on average as PSNR-Y differences: real - none, oracle - real, real - ablation.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_write
from .data import DEFAULT_MAX_PIXELS, Pair, bicubic_down, bicubic_up, load_pairs, quantize
from .distributed import Context
from .infer import super_resolve
from .metrics import psnr_y, ssim_y

ROWS = ("bicubic", "srntt_ref", "srntt_noref", "srntt_oracle", "srntt_ablation")
ROW_LABELS = {
    "bicubic": "Bicubic",
    "srntt_ref": "SRNTT, real reference",
    "srntt_noref": "SRNTT, no reference (LR↑ as ref)",
    "srntt_oracle": "SRNTT, oracle (HR as ref)",
    "srntt_ablation": "SRNTT, reference ablation (swapped maps zeroed)",
}
# PSNR-Y differences that separate the reference's effect: name -> (row, minus row)
EFFECTS = {
    "ref_minus_noref": ("srntt_ref", "srntt_noref"),
    "oracle_minus_ref": ("srntt_oracle", "srntt_ref"),
    "ref_minus_ablation": ("srntt_ref", "srntt_ablation"),
}
EFFECT_LABELS = {"ref_minus_noref": "real − none", "oracle_minus_ref": "oracle − real",
                 "ref_minus_ablation": "real − ablation"}


class ZeroMaps(nn.Module):
    """``model`` run with its swapped maps replaced by zeros (the reference ablation row)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(x, {k: torch.zeros_like(v) for k, v in maps.items()})


@dataclass
class EvalResult:
    dataset: str
    layout: str
    per_image: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def mean(self, row: str, metric: str) -> float:
        vals = [r[f"{row}_{metric}"] for r in self.per_image if f"{row}_{metric}" in r]
        return sum(vals) / len(vals) if vals else float("nan")

    def rows(self) -> list[str]:
        return [r for r in ROWS if self.per_image and f"{r}_psnr" in self.per_image[0]]

    def effects(self) -> list[str]:
        return [e for e in EFFECTS if self.per_image and e in self.per_image[0]]

    def table(self) -> str:
        lines = [f"{self.dataset} ({self.layout}, {len(self.per_image)} images): PSNR-Y / SSIM-Y, 4 px shave",
                 "", "| method | PSNR-Y (dB) | SSIM-Y | vs bicubic (dB) |", "|---|---|---|---|"]
        base = self.mean("bicubic", "psnr")
        for r in self.rows():
            p, s = self.mean(r, "psnr"), self.mean(r, "ssim")
            lines.append(f"| {ROW_LABELS[r]} | {p:.2f} | {s:.4f} | {p - base:+.2f} |")
        effects = self.effects()
        if effects:
            lines += ["", "Reference effect, PSNR-Y (dB):", "",
                      "| image | " + " | ".join(EFFECT_LABELS[e] for e in effects) + " |",
                      "|---" * (len(effects) + 1) + "|"]
            lines += [f"| {r['name']} | " + " | ".join(f"{r[e]:+.3f}" for e in effects) + " |"
                      for r in self.per_image]
            means = " | ".join(f"**{self.mean_effect(e):+.3f}**" for e in effects)
            lines.append(f"| **mean** | {means} |")
            lines.append("| images > 0 | " + " | ".join(
                f"{sum(r[e] > 0 for r in self.per_image)}/{len(self.per_image)}" for e in effects) + " |")
        return "\n".join(lines)

    def mean_effect(self, effect: str) -> float:
        vals = [r[effect] for r in self.per_image if effect in r]
        return sum(vals) / len(vals) if vals else float("nan")

    def write_csv(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = ["name"] + [f"{r}_{m}" for r in self.rows() for m in ("psnr", "ssim")] + self.effects()
        text = io.StringIO()
        w = csv.DictWriter(text, keys, extrasaction="ignore")
        w.writeheader()
        for row in self.per_image:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
        return atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def evaluate_pairs(model, pairs: Sequence[Pair], *, rows: Sequence[str] = ROWS, backend: str = "auto",
                   tile: int | None = 128, overlap: int = 16, dataset: str = "", layout: str = "",
                   verbose: bool = True, fast: bool = True) -> EvalResult:
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"rows: unknown {unknown}; choose from {ROWS}")
    result = EvalResult(dataset, layout)
    ablated = ZeroMaps(model)
    t0 = time.perf_counter()
    for pair in pairs:
        hr = pair.hr
        lr = bicubic_down(hr)
        bic = bicubic_up(lr)
        outputs = {}
        if "bicubic" in rows:
            outputs["bicubic"] = bic
        # the ablation's swap runs on the no-reference input; its maps are then zeroed
        refs_for = {"srntt_ref": pair.refs, "srntt_noref": [bic], "srntt_oracle": [hr],
                    "srntt_ablation": [bic]}
        for r in ("srntt_ref", "srntt_noref", "srntt_oracle", "srntt_ablation"):
            if r in rows:
                net = ablated if r == "srntt_ablation" else model
                outputs[r] = super_resolve(net, lr, refs_for[r], backend=backend, tile=tile,
                                           overlap=overlap, fast=fast).cpu()
        rec = {"name": pair.name}
        for r, out in outputs.items():
            out = quantize(out)
            rec[f"{r}_psnr"], rec[f"{r}_ssim"] = psnr_y(out, hr), ssim_y(out, hr)
        for e, (a, b) in EFFECTS.items():
            if a in outputs and b in outputs:
                rec[e] = rec[f"{a}_psnr"] - rec[f"{b}_psnr"]
        result.per_image.append(rec)
        if verbose:
            scores = ", ".join(f"{r} {rec[f'{r}_psnr']:.2f}" for r in outputs)
            print(f"  {pair.name}: {scores}", file=sys.stderr)
    result.seconds = time.perf_counter() - t0
    return result


def evaluate_folder(model, folder: str | os.PathLike, *, layout: str = "auto", limit: int | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS, ctx: Context | None = None, **kwargs) -> EvalResult:
    """The table of ``folder``. With a distributed ``ctx`` each rank evaluates its share of the
    images and every rank returns the whole table (all-gathered, in the folder's order;
    ``seconds`` is the slowest rank's)."""
    from .data import is_cufed5_folder

    ctx = ctx or Context()
    resolved = layout if layout != "auto" else ("cufed5" if is_cufed5_folder(folder) else "split")
    pairs = load_pairs(folder, resolved, max_pixels=max_pixels)
    if limit:
        pairs = pairs[:limit]
    result = evaluate_pairs(model, ctx.shard(pairs), dataset=Path(folder).name, layout=resolved, **kwargs)
    if ctx.distributed:
        shares = ctx.gather((result.per_image, result.seconds))
        # rank r holds images r, r + W, ...: interleave the shares back into the folder's order
        result.per_image = [shares[i % ctx.world_size][0][i // ctx.world_size] for i in range(len(pairs))]
        result.seconds = max(sec for _, sec in shares)
    return result
