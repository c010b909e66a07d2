"""Subcommands ``sr``, ``demo``, ``eval`` and ``train`` of the ``srntt`` CLI.

Each has ``add_<cmd>_arguments(parser)`` and ``run_<cmd>(args) -> int`` (exit status);
``srntt_core.cli`` dispatches to them and turns user errors (OSError, ValueError: missing,
corrupt or too large files, a refused checkpoint, a bad output path or device) into one line
on stderr and exit status 2. Arguments, output paths and the device are checked before any
work starts. The rules are documented in docs/CLI.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import SAMPLE_IMAGE

DEMO_FILES = ("lr", "reference", "bicubic", "srntt", "hr", "comparison")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _add_common(p: argparse.ArgumentParser, tile: bool = True) -> None:
    from ..models.data import DEFAULT_MAX_PIXELS

    p.add_argument("--checkpoint", default="bundled",
                   help="SRNTT checkpoint (default: the bundled SRNTT-l2 model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "cuda", "triton", "torch"],
                   help="patch-matching / swapping backend (default auto)")
    p.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images (and, for sr, outputs) above this many pixels "
                        f"(default {DEFAULT_MAX_PIXELS:_})")
    if tile:
        p.add_argument("--tile", type=int, default=128,
                       help="LR tile size for large inputs (0: no tiling; default 128)")
        p.add_argument("--overlap", type=int, default=16, help="tile overlap in LR pixels (default 16)")


def _check_tiling(args) -> None:
    from ..models.infer import check_tiling

    check_tiling(args.tile or None, args.overlap)


def _progress_bar(desc: str):
    from tqdm import tqdm

    state = {}

    def update(done: int, total: int) -> None:
        if total <= 1:
            return
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, unit="tile", leave=False)
        state["bar"].update(done - state["bar"].n)
        if done == total:
            state["bar"].close()

    return update


# ---------------------------------------------------------------------------------------------
# sr

def add_sr_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="low-resolution image (any size); or a folder of them; or a CSV file of "
                                 "input,ref[,ref2...] rows (paths relative to the CSV)")
    p.add_argument("--ref", action="append", default=[], metavar="REF",
                   help="reference image (repeat for several); with a folder input: a folder of references "
                        "paired by file name; none: the LR upsampled (no-reference mode)")
    p.add_argument("-o", "--out", required=True,
                   help="output image (x4; its extension gives the format); with a folder or CSV input: the "
                        "output folder (NAME.png per input)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file, even one of the inputs (folder / CSV input: "
                        "without it, finished outputs are skipped)")
    p.add_argument("--compile", action="store_true",
                   help="compile the generator with torch.compile (inductor; CUDA graphs on a GPU): pays "
                        "a compile per tile shape, for many images of one size (docs/benchmarks.md)")
    _add_common(p)


def run_sr(args) -> int:
    import torch

    if Path(args.input).is_dir() or Path(args.input).suffix.lower() == ".csv":
        return run_sr_many(args)

    from ..models.data import ImageTooLargeError, check_output_path, image_size, load_image, save_image
    from ..models.infer import load_model, no_reference, resolve_device, super_resolve

    device = resolve_device(args.device)
    _check_tiling(args)
    out = check_output_path(args.out, inputs=[args.input, *args.ref], overwrite=args.overwrite)
    w, h = image_size(args.input, args.max_pixels)
    if 16 * w * h > args.max_pixels:
        raise ImageTooLargeError(
            f"{args.input}: the x4 output would be {4 * w}x{4 * h} = {16 * w * h:,} pixels, "
            f"above the limit of {args.max_pixels:,} (--max-pixels raises it)"
        )
    lr = load_image(args.input, args.max_pixels)
    refs = [load_image(r, args.max_pixels) for r in args.ref]
    model = load_model(args.checkpoint, device)
    if not refs:
        print("srntt sr: no --ref given; using the LR upsampled as reference (no-reference mode)",
              file=sys.stderr)
        refs = [no_reference(lr)]
    t0 = time.perf_counter()
    sr = super_resolve(model, lr, refs, backend=args.backend, tile=args.tile or None,
                       overlap=args.overlap, progress=_progress_bar("sr"), compile=args.compile)
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    save_image(sr.cpu(), out)
    h, w = lr.shape[-2:]
    print(f"{args.input} ({w}x{h}) -> {out} ({4 * w}x{4 * h}), {len(refs)} reference(s), "
          f"{secs:.2f} s on {device}")
    return 0


def sr_jobs(source: str, refs: list[str], out_dir: str) -> list[tuple[Path, list[Path], Path]]:
    """``(input, references, output)`` for a folder of inputs (references: none, or one folder
    whose files pair with the inputs by file name, extension aside) or a CSV of
    ``input,ref[,ref2...]`` rows (paths relative to the CSV; a header row ``input,...`` is
    skipped). Every file is checked to exist before any work."""
    import csv

    from ..models.data import IMAGE_EXTENSIONS, list_images

    src, out = Path(source), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"-o/--out: {out} is a file; a folder or CSV input needs an output folder")
    rows: list[tuple[Path, list[Path]]] = []
    if src.is_dir():
        if len(refs) > 1 or (refs and not Path(refs[0]).is_dir()):
            raise ValueError("--ref: with a folder input give one folder of references (paired by file name)")
        by_stem = {}
        if refs:
            for p in list_images(refs[0]):
                by_stem.setdefault(p.stem, p)
        inputs = list_images(src)
        if not inputs:
            raise ValueError(f"input: no images ({', '.join(IMAGE_EXTENSIONS)}) in {src}")
        missing = [p.name for p in inputs if refs and p.stem not in by_stem]
        if missing:
            raise FileNotFoundError(f"--ref: no reference named like {', '.join(missing[:3])}"
                                    f"{' ...' if len(missing) > 3 else ''} in {refs[0]}")
        rows = [(p, [by_stem[p.stem]] if refs else []) for p in inputs]
    else:
        if refs:
            raise ValueError("--ref: with a CSV input the references are the CSV's columns")
        if not src.is_file():
            raise FileNotFoundError(f"input: CSV file not found: {src}")
        with open(src, newline="") as f:
            lines = [[c.strip() for c in r if c.strip()] for r in csv.reader(f)]
        lines = [r for r in lines if r]
        if lines and lines[0][0].lower() == "input" and not (src.parent / lines[0][0]).exists():
            lines = lines[1:]
        rows = [(src.parent / r[0], [src.parent / c for c in r[1:]]) for r in lines]
        if not rows:
            raise ValueError(f"input: {src} has no input,ref rows")
        for i, (inp, rs) in enumerate(rows):
            for p in (inp, *rs):
                if not p.is_file():
                    raise FileNotFoundError(f"input: {src} row {i + 1}: image not found: {p}")
    jobs, seen = [], {}
    for inp, rs in rows:
        target = out / f"{inp.stem}.png"
        if target in seen:
            raise ValueError(f"input: {inp} and {seen[target]} would both write {target}; rename one")
        seen[target] = inp
        jobs.append((inp, rs, target))
    return jobs


def run_sr_many(args) -> int:
    """Folder / CSV input; under torchrun each rank takes its share of the images."""
    import torch
    from tqdm import tqdm

    from ..models import distributed
    from ..models.checkpoint import remove_partials
    from ..models.data import ImageTooLargeError, image_size, load_image, save_image
    from ..models.infer import ReferenceBank, load_model, no_reference, prepare_reference, super_resolve
    from ..swap import default_extractor

    _check_tiling(args)
    jobs = sr_jobs(args.input, args.ref, args.out)
    for inp, _, target in jobs:
        if not args.overwrite and target.exists() and os.path.samefile(target, inp):
            raise ValueError(f"-o/--out: {target} is also an input; refusing to overwrite an input "
                             "(pass --overwrite to allow it)")
    with distributed.session(args.device) as (ctx, device):
        Path(args.out).mkdir(parents=True, exist_ok=True)
        # jobs of one reference set are contiguous in every rank's share: its features are
        # computed once per rank and kept while they are used
        jobs.sort(key=lambda j: ([str(r) for r in j[1]], str(j[0])))
        mine = ctx.shard(jobs)
        model = load_model(args.checkpoint, device)
        extractor = default_extractor().to(device)
        bank_key, bank = None, None
        written = skipped = 0
        t0 = time.perf_counter()
        for inp, refs, target in tqdm(mine, desc=f"sr rank {ctx.rank}" if ctx.distributed else "sr",
                                      unit="image", disable=not ctx.is_main):
            remove_partials(target)
            if target.exists() and not args.overwrite:
                skipped += 1
                continue
            w, h = image_size(inp, args.max_pixels)
            if 16 * w * h > args.max_pixels:
                raise ImageTooLargeError(f"{inp}: the x4 output would be {4 * w}x{4 * h} pixels, above the "
                                         f"limit of {args.max_pixels:,} (--max-pixels raises it)")
            lr = load_image(inp, args.max_pixels)
            key = tuple(refs) if refs else None
            if key is None or key != bank_key:
                ref_imgs = [load_image(r, args.max_pixels) for r in refs] or [no_reference(lr)]
                bank = ReferenceBank([prepare_reference(r.to(device)) for r in ref_imgs], extractor,
                                     args.backend, channels_last=True)  # as super_resolve's fast path
                bank_key = key
            sr = super_resolve(model, lr, bank, backend=args.backend, tile=args.tile or None,
                               overlap=args.overlap, compile=args.compile)
            save_image(sr.cpu(), target)
            written += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        counts = ctx.gather((written, skipped, secs))
    if ctx.is_main:
        done = sum(c[0] for c in counts)
        wall = max(c[2] for c in counts)
        print(f"srntt sr: {len(jobs)} image(s): {done} written, {sum(c[1] for c in counts)} skipped "
              f"(already done; --overwrite redoes them) -> {args.out}; {wall:.2f} s on {ctx.world_size} "
              f"rank(s) ({done / max(wall, 1e-9):.2f} images/s, {device.type})")
    return 0


# ---------------------------------------------------------------------------------------------
# demo

def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--image", default=str(SAMPLE_IMAGE),
                   help="HR image to demo on (split-image protocol: left half target, right half reference)")
    _add_common(p)


def side_by_side(panels: list[tuple[str, object]], ref: tuple[str, object] | None = None):
    """Top row: the labelled panels (PIL images of one size); below: the reference, labelled."""
    from PIL import Image, ImageDraw

    w, h = panels[0][1].size
    label_h, gap = 18, 4
    width = len(panels) * w + (len(panels) - 1) * gap
    ref_h = ref[1].height + label_h + gap if ref else 0
    canvas = Image.new("RGB", (max(width, ref[1].width if ref else 0), h + label_h + ref_h), "white")
    d = ImageDraw.Draw(canvas)
    for i, (label, im) in enumerate(panels):
        x = i * (w + gap)
        canvas.paste(im, (x, label_h))
        d.text((x + 4, 3), label, fill="black")
    if ref:
        y = h + label_h + gap
        d.text((4, y + 3), ref[0], fill="black")
        canvas.paste(ref[1], (0, y + label_h))
    return canvas


def run_demo(args) -> int:
    import torch

    from ..models.checkpoint import atomic_write
    from ..models.data import (
        bicubic_down,
        bicubic_up,
        check_output_path,
        load_image,
        quantize,
        save_image,
        split_image,
        tensor_to_pil,
    )
    from ..models.infer import load_model, resolve_device, super_resolve
    from ..models.metrics import psnr_y, ssim_y

    device = resolve_device(args.device)
    _check_tiling(args)
    out = Path(args.out)
    for name in DEMO_FILES:
        # the demo's own file names in its folder are replaced on every run, never the input
        check_output_path(out / f"{name}.png", what="-o/--out", overwrite=True)
        if Path(args.image).resolve() == (out / f"{name}.png").resolve():
            raise ValueError(f"-o/--out: {out / name}.png would overwrite the input --image")
    target, ref = split_image(load_image(args.image, args.max_pixels))
    t0 = time.perf_counter()
    model = load_model(args.checkpoint, device)
    t_load = time.perf_counter() - t0
    lr = bicubic_down(target)
    t0 = time.perf_counter()
    bic = bicubic_up(lr)
    t_bic = time.perf_counter() - t0
    t0 = time.perf_counter()
    sr = super_resolve(model, lr, [ref], backend=args.backend, tile=args.tile or None, overlap=args.overlap)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_sr = time.perf_counter() - t0
    sr = quantize(sr.cpu())
    for name, img in (("lr", lr), ("reference", ref), ("bicubic", bic), ("srntt", sr), ("hr", target)):
        save_image(img, out / f"{name}.png")
    panels = [("Bicubic", tensor_to_pil(bic)), ("SRNTT", tensor_to_pil(sr)), ("HR", tensor_to_pil(target))]
    pic = side_by_side(panels,
                       ("Reference (other half of the image)", tensor_to_pil(ref)))
    atomic_write(out / "comparison.png", lambda f: pic.save(f, format="PNG"))
    res = {
        "bicubic": (psnr_y(bic, target), ssim_y(bic, target)),
        "srntt": (psnr_y(sr, target), ssim_y(sr, target)),
    }
    h, w = lr.shape[-2:]
    print(f"srntt demo: {Path(args.image).name}, LR {w}x{h} -> {4 * w}x{4 * h}, "
          f"reference {ref.shape[-1]}x{ref.shape[-2]}, "
          f"device {device}, backend {args.backend}")
    print("            PSNR-Y (dB)  SSIM-Y")
    for k, (p, s) in res.items():
        print(f"  {k:9s} {p:10.2f}  {s:7.4f}")
    print(f"time: model load {t_load:.2f} s, bicubic {t_bic * 1000:.0f} ms, "
          f"SRNTT (swap + network) {t_sr:.2f} s")
    print(f"wrote {out}/srntt.png, {out}/comparison.png (bicubic | SRNTT | HR, and the reference)")
    return 0


# ---------------------------------------------------------------------------------------------
# eval

def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset_dir", help="folder of HR images (split-image protocol) or in CUFED5 layout")
    p.add_argument("--layout", default="auto", choices=["auto", "split", "cufed5"])
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--rows", default="bicubic,srntt_ref,srntt_noref,srntt_oracle,srntt_ablation",
                   help="comma-separated rows: bicubic, srntt_ref, srntt_noref, srntt_oracle, srntt_ablation "
                        "(swapped maps zeroed); the reference's effect (real - none, oracle - real, "
                        "real - ablation) is shown for the rows given")
    p.add_argument("--csv", default=None, help="also write per-image results to this CSV")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    p.add_argument("--straightforward", action="store_true",
                   help="run the model as given (BatchNorm unfolded, NCHW, plain torch ops) instead of the "
                        "fast path")
    _add_common(p)


def run_eval(args) -> int:
    from ..models import distributed
    from ..models.data import check_output_path
    from ..models.evaluate import ROWS, evaluate_folder
    from ..models.infer import load_model, resolve_device

    resolve_device(args.device)
    _check_tiling(args)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {args.limit}")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise ValueError(f"--rows: unknown or empty {unknown or rows}; choose from {', '.join(ROWS)}")
    if args.csv:
        check_output_path(args.csv, overwrite=args.overwrite, extensions=(".csv",), what="--csv")
    with distributed.session(args.device) as (ctx, device):
        model = load_model(args.checkpoint, device)
        result = evaluate_folder(model, args.dataset_dir, layout=args.layout, limit=args.limit, rows=rows,
                                 backend=args.backend, tile=args.tile or None, overlap=args.overlap,
                                 max_pixels=args.max_pixels, ctx=ctx, fast=not args.straightforward)
    if not ctx.is_main:
        return 0
    print(result.table())
    ranks = f" x {ctx.world_size} ranks" if ctx.distributed else ""
    print(f"\n({result.seconds:.1f} s on {device}{ranks})")
    if args.csv:
        print(f"per-image results: {result.write_csv(args.csv)}")
    return 0


# ---------------------------------------------------------------------------------------------
# train

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="+", help="training folders: HR images (split-image pairs) or CUFED5 layout")
    p.add_argument("--out", required=True, help="run folder (checkpoints, loss log); an existing run resumes")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=9,
                   help="global batch (default 9); under torchrun each rank takes batch / world size")
    p.add_argument("--crop", type=int, default=160, help="HR crop (multiple of 4; default 160)")
    p.add_argument("--ref-crop", type=int, default=160, help="reference crop (default 160)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="cosine: from --lr to lr x --lr-floor over --steps (or --time-budget)")
    p.add_argument("--lr-floor", type=float, default=0.05, help="cosine end value relative to --lr (0.05)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear lr warm-up over the first steps")
    p.add_argument("--losses", default="l2", choices=["l2", "full"],
                   help="l2: reconstruction only (SRNTT-l2); full: + perceptual, texture, WGAN-GP")
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="reconstruction-only steps before full losses")
    p.add_argument("--texture-weighting", default="code", choices=["none", "paper", "code"])
    p.add_argument("--train-with-truth", action="store_true",
                   help="extra update per batch with the HR's own VGG features as swapped maps")
    p.add_argument("--truth-every", type=int, default=1, help="do the truth update every k-th step")
    p.add_argument("--residual", default=None, choices=["bicubic"],
                   help="NOT in the original: predict a residual on top of bicubic x4 (faster convergence)")
    p.add_argument("--augment", action="store_true", help="random flips / rotations (not in the original)")
    p.add_argument("--pair-mix", default="half:1",
                   help="reference modes of the training pairs, e.g. overlap:0.5,half:0.3,unrelated:0.2 "
                        "(overlap: another view of the target's image; half: the item's own reference; "
                        "unrelated: another image). Default half:1")
    p.add_argument("--init", default=None,
                   help="a new run starts from these generator weights: 'bundled' or a checkpoint file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on GPU")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "cuda", "triton", "torch"])
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds of training")
    p.add_argument("--stop-at", default=None, help="stop and save before this UTC time (HH:MM or ISO)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--bn-recalibrate", type=int, default=0, help="batches to re-estimate BN statistics with")
    p.add_argument("--export", default=None, help="write an fp16 inference checkpoint here at the end")
    p.add_argument("--batch-norm", default="batch", choices=["batch", "sync", "frozen"],
                   help="batch: statistics per rank (default); sync: SyncBatchNorm over the ranks (GPUs); "
                        "frozen: running statistics (a step does not depend on the world size)")
    p.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="under torchrun: seconds a rank waits for the others before the job stops")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="do not log to RUN/tensorboard (done when TensorBoard is installed)")


# `srntt train` flags whose names differ from their TrainConfig field; a `--no-X` flag sets X to False
TRAIN_FLAG_FIELDS = {"threads": "num_threads"}
_TOP_LEVEL_DESTS = ("command", "version")  # set by the `srntt` parser itself


def train_config(args):
    """The TrainConfig of parsed ``srntt train`` flags: every flag sets the field of its name
    (see :data:`TRAIN_FLAG_FIELDS`); a flag without a field is an error, not a setting dropped."""
    import dataclasses

    from ..models.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {}
    for dest, value in vars(args).items():
        if dest in _TOP_LEVEL_DESTS:
            continue
        if dest.startswith("no_") and dest[3:] in fields:
            values[dest[3:]] = not value
            continue
        name = TRAIN_FLAG_FIELDS.get(dest, dest)
        if name not in fields:
            raise TypeError(f"srntt train: the flag for {dest!r} has no TrainConfig field")
        values[name] = value
    return TrainConfig(**values)


def run_train(args) -> int:
    from ..models.train import train

    cfg = train_config(args)
    try:
        summary = train(cfg)
    except KeyboardInterrupt:
        return 130
    if summary["rank"] == 0:
        print(json.dumps(summary))
    return 0

