"""``srntt bench``: a quick patch-matching comparison on the current machine.

Times every backend that can run here against faiss ``IndexFlatIP`` (when faiss is installed) and a
TTSR-style ``unfold + normalize + bmm + max``, at a small (training crop) and a medium (CUFED5-size)
relu3_1 shape, and prints times, equivalent 2304-d GFLOP/s and speed ratios. The full suite with
memory, feature swapping, real features and larger shapes is ``make bench`` (``benchmarks/``).

The two peers live here so that an installed package can run them; ``benchmarks/peers.py``
re-exports them beside the other competitors.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from ..ops.geometry import EPS, grid_size
from . import SAMPLE_IMAGE

# relu3_1 (H, W) of a 160x160 training crop and of a 500x332 CUFED5-size image
SHAPES = {"small": (40, 40), "medium": (83, 125), "large": (270, 480)}
# The TTSR peer holds the whole N_key x N_query matrix; beyond this it is skipped.
TTSR_MAX_BYTES = 4 << 30


def im2col(x: torch.Tensor, patch_size: int = 3, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*patch_size^2): every patch's descriptor, row-major over the grid."""
    return F.unfold(x, patch_size, padding=padding, stride=stride).transpose(1, 2)


def _grid(x: torch.Tensor, patch_size: int, stride: int, padding: int) -> tuple[int, int]:
    return tuple(grid_size(s, patch_size, stride, padding) for s in x.shape[-2:])


def faiss_patch_match(query, key, patch_size=3, stride=1, padding=0):
    """faiss ``IndexFlatIP`` (exhaustive inner product, k=1) over L2-normalized im2col patches."""
    import faiss

    gqh, gqw = _grid(query, patch_size, stride, padding)
    index = torch.empty(query.shape[0], gqh * gqw, dtype=torch.long)
    score = torch.empty(query.shape[0], gqh * gqw, dtype=torch.float32)
    for b in range(query.shape[0]):
        q = F.normalize(im2col(query[b : b + 1].float(), patch_size, stride, padding)[0], dim=1, eps=EPS)
        k = F.normalize(im2col(key[b : b + 1].float(), patch_size, stride, padding)[0], dim=1, eps=EPS)
        flat = faiss.IndexFlatIP(k.shape[1])
        flat.add(k.cpu().contiguous().numpy())
        d, i = flat.search(q.cpu().contiguous().numpy(), 1)
        index[b], score[b] = torch.from_numpy(i[:, 0]), torch.from_numpy(d[:, 0])
    return index.view(-1, gqh, gqw), score.view(-1, gqh, gqw)


def ttsr_patch_match(query, key, patch_size=3, stride=1, padding=0):
    """TTSR ``SearchTransformer``: unfold, ``F.normalize``, one ``bmm`` (N_key x N_query), ``max``."""
    gqh, gqw = _grid(query, patch_size, stride, padding)
    q = F.normalize(F.unfold(query, patch_size, padding=padding, stride=stride), dim=1, eps=EPS)
    k = F.normalize(F.unfold(key, patch_size, padding=padding, stride=stride), dim=1, eps=EPS)
    relevance = torch.bmm(k.transpose(1, 2), q)  # (B, N_key, N_query)
    score, index = relevance.max(dim=1)
    return index.view(-1, gqh, gqw), score.view(-1, gqh, gqw)


def equivalent_gflops(n_query: int, n_key: int, channels: int, seconds: float, patch_size: int = 3) -> float:
    """Throughput as if the direct method ran: 2 * Nq * Nk * C * patch_size^2 FLOPs per call."""
    return 2.0 * n_query * n_key * channels * patch_size**2 / seconds / 1e9


def _time(fn, rounds: int, sync) -> float:
    fn()  # warm-up: first-call allocations, lazy imports, OpenMP start-up
    sync()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _features(shape: tuple[int, int], channels: int, device: torch.device, real: bool):
    if not real:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, channels, *shape, generator=g)
        k = torch.randn(1, channels, *shape, generator=g)
        return q.to(device), k.to(device)

    import numpy as np
    from PIL import Image

    from ..models.vgg import VGG19Features

    # The bundled demo image, split in two halves: matching one against the other is the
    # split-image reference protocol (docs/CONTRACT.md §10).
    img = Image.open(SAMPLE_IMAGE).convert("RGB")
    half = img.width // 2
    size = (shape[1] * 4, shape[0] * 4)
    pair = [img.crop((0, 0, half, img.height)), img.crop((half, 0, 2 * half, img.height))]
    x = torch.stack([torch.from_numpy(np.array(p.resize(size, Image.BICUBIC))) for p in pair])
    x = x.permute(0, 3, 1, 2).float().div(255)
    with torch.no_grad():
        feats = VGG19Features(("relu3_1",))(x)["relu3_1"]
    return feats[:1].to(device), feats[1:].to(device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="small,medium",
                        help=f"comma-separated, from {list(SHAPES)} or HxW (relu3_1 size)")
    parser.add_argument("--channels", type=int, default=256, help="feature channels (relu3_1: 256)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per case; the best is reported")
    parser.add_argument("--features", choices=("random", "real"), default="random",
                        help="random normal features, or relu3_1 of the bundled image's two halves")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated srntt backends (default: every one that can run here)")
    parser.add_argument("--no-peers", action="store_true", help="skip faiss and the TTSR bmm")


def _parse_shape(text: str) -> tuple[str, tuple[int, int]]:
    if text in SHAPES:
        return text, SHAPES[text]
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is neither one of {list(SHAPES)} nor HxW") from None
    return text, (h, w)


def run(args: argparse.Namespace) -> int:
    from .. import swap
    from .machine import machine_name

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    backends = args.backends.split(",") if args.backends else swap.available(device)
    peers = {}
    if not args.no_peers:
        try:
            import faiss  # noqa: F401

            if device.type == "cpu":
                peers["faiss"] = faiss_patch_match
        except ImportError:
            print("faiss: not installed (pip install faiss-cpu), skipped")
        peers["ttsr_bmm"] = ttsr_patch_match
    load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    print(f"srntt bench on {machine_name(str(device))} ({device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {load})")
    print(f"patch_match, 3x3 patches, valid grid, {args.channels} channels, {args.features} features; "
          f"best of {args.rounds} rounds")
    header = (f"{'shape':>16} {'provider':>10} {'N_query':>8} {'time ms':>10} {'GFLOP/s':>8} "
              f"{'vs faiss':>9} {'vs ttsr':>8}")
    print(header)
    print("-" * len(header))
    for text in args.shapes.split(","):
        name, shape = _parse_shape(text.strip())
        q, k = _features(shape, args.channels, device, args.features == "real")
        nq = (shape[0] - 2) * (shape[1] - 2)
        times: dict[str, float | None] = {}
        for backend in backends:
            def match(b=backend, q=q, k=k):
                return swap.patch_match(q, k, backend=b)
            times[backend] = _time(match, args.rounds, sync)
        for peer, fn in peers.items():
            if peer == "ttsr_bmm" and nq * nq * 4 > TTSR_MAX_BYTES:
                times[peer] = None  # the N x N matrix would not fit
                continue
            times[peer] = _time(lambda f=fn, q=q, k=k: f(q, k), args.rounds, sync)
        for provider, t in times.items():
            label = f"{name} {shape[0]}x{shape[1]}" if name in SHAPES else name
            if t is None:
                print(f"{label:>16} {provider:>10} {nq:>8} {'skipped: N x N > 4 GiB':>28}")
                continue
            ratio = {p: f"{times[p] / t:.2f}x" if times.get(p) else "-" for p in ("faiss", "ttsr_bmm")}
            gflops = equivalent_gflops(nq, nq, args.channels, t)
            print(f"{label:>16} {provider:>10} {nq:>8} {t * 1e3:>10.1f} {gflops:>8.1f} "
                  f"{ratio['faiss']:>9} {ratio['ttsr_bmm']:>8}")
    print("ratios: the peer's time / this provider's time (> 1: this provider is faster)")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="srntt bench", description=__doc__)
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
