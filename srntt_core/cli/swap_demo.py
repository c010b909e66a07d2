"""The swap stage on the bundled sample pair, drawn: LR↑ input | reference | correspondence | swapped texture.

The bundled sample is one real image split in two halves (docs/CONTRACT.md §10): the left half is the target
(its bicubic x1/4 is the LR input), the right half is the reference. Matching runs on relu3_1
features; the "swapped texture" panel is the reference's own pixels moved by the matched
correspondence (``feature_swap`` at scale 4 on RGB), which shows what the network receives.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .. import swap
from ..models import data
from ..ops.dispatch import available
from . import SAMPLE_IMAGE


def correspondence_image(
    index: torch.Tensor, key_grid: tuple[int, int], size: tuple[int, int]
) -> Image.Image:
    """Colour-codes each query cell by the position of its matched key cell (red: row, green: column)."""
    gh, gw = key_grid
    u = (index // gw).float() / max(gh - 1, 1)
    v = (index % gw).float() / max(gw - 1, 1)
    rgb = torch.stack([u, v, 1 - 0.5 * (u + v)], dim=0)  # (3, Gq_h, Gq_w)
    return data.tensor_to_pil(rgb).resize(size, Image.NEAREST)


def _panel(images: list[tuple[str, Image.Image]]) -> Image.Image:
    w, h = images[0][1].size
    canvas = Image.new("RGB", (w * len(images), h + 18), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, im) in enumerate(images):
        canvas.paste(im.resize((w, h)), (i * w, 18))
        draw.text((i * w + 4, 3), title, fill="black")
    return canvas


def _timed(fn, repeats: int = 3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def run(out: str | Path = "out/swap_demo.png", backend: str = "auto",
        sample: str | Path = SAMPLE_IMAGE) -> int:
    # the figure is regenerated on every run (as `srntt demo`'s), but never over the input image
    out = data.check_output_path(out, what="-o/--out", overwrite=True)
    if Path(sample).exists() and out.exists() and out.samefile(sample):
        raise ValueError(f"-o/--out: {out} is the --sample image; refusing to overwrite an input")
    torch.manual_seed(0)
    hr = data.mod_crop(data.load_image(sample))
    target, ref = (x.unsqueeze(0) for x in data.split_image(hr))
    lr = data.bicubic_down(target)
    lr_up = data.bicubic_up(lr)
    swapper = swap.TextureSwapper(backend=backend)
    extractor = swapper.extractor
    with torch.no_grad():
        t0 = time.perf_counter()
        result = swapper(lr, ref, lr_up=lr_up)
        total = time.perf_counter() - t0
        query = extractor(lr_up)["relu3_1"]
        key = swap.reference_features(ref, extractor).key
        print(f"sample {Path(sample).name}: target {tuple(target.shape[-2:])}, "
              f"reference {tuple(ref.shape[-2:])}, "
              f"relu3_1 maps {tuple(query.shape[-2:])} vs {tuple(key.shape[-2:])}, "
              f"{query.shape[-2] * query.shape[-1]} x {key.shape[-2] * key.shape[-1]} patches x 2304 dims")
        print(f"texture_swap (VGG + match + 3-level swap), backend={backend}: {total * 1e3:.0f} ms")
        for name in available(query.device):
            if name == "triton":
                continue
            m, t_match = _timed(lambda n=name: swap.patch_match(query, key, backend=n))
            _, t_swap = _timed(lambda n=name, m=m: swap.feature_swap(ref, m.index, scale=4, backend=n))
            print(f"  backend {name:6s}: patch_match {t_match * 1e3:8.1f} ms   "
                  f"feature_swap (RGB x4) {t_swap * 1e3:7.1f} ms")
        swapped_rgb = swap.feature_swap(ref, result.index, scale=4, out_size=tuple(target.shape[-2:]))
    size = (target.shape[-1], target.shape[-2])
    key_grid = (key.shape[-2] - 2, key.shape[-1] - 2)
    figure = _panel([
        ("LR x4 bicubic (input)", data.tensor_to_pil(lr_up[0])),
        ("reference", data.tensor_to_pil(ref[0]).resize(size)),
        ("matched position in ref", correspondence_image(result.index[0], key_grid, size)),
        ("swapped reference texture", data.tensor_to_pil(swapped_rgb[0].clamp(0, 1))),
    ])
    data.save_image(figure, out)
    print(f"mean best-match similarity {result.score.mean():.3f}; wrote {out}")
    return 0


def add_arguments(p) -> None:
    p.add_argument("-o", "--out", default="out/swap_demo.png", help="output PNG (default out/swap_demo.png)")
    p.add_argument("--backend", default="auto", help="auto, cpu, cuda, triton or torch")
    p.add_argument("--sample", default=str(SAMPLE_IMAGE),
                   help="an image to split into target and reference halves")


def run_cli(args) -> int:
    return run(args.out, backend=args.backend, sample=args.sample)
