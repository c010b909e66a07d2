"""Performance model of the GPU kernels, and predicted-vs-measured from pytest-benchmark JSON.

    python scripts/gpu_perf.py table [--gpu H200]          # markdown table of the predictions
    python scripts/gpu_perf.py compare BENCH.json [...]    # predicted next to measured, per row
    python scripts/gpu_perf.py fake-json OUT.json          # a benchmark JSON of the same layout (dry runs)

The model (docs/benchmarks.md, "Predicted, not measured"): a kernel takes the larger of its
compute time (FLOPs / (peak * efficiency)) and its memory time (bytes / (bandwidth * efficiency)),
plus a fixed launch/host overhead per call. patch_match on float32 finds candidates on tensor cores
(TF32 for "highest"/"high", bf16 for "medium") and re-scores at most 32 candidates per query in
fp32 on the CUDA cores: two tensor-core passes (max, collect), pipelined wgmma tiles in Triton,
64x64 wmma tiles in CUDA, then one warp per candidate (queries with more than 32 candidates,
flat regions, fall back to in-tile re-scoring, not modelled). The
TTSR peer is one fp32 SIMT bmm (torch leaves TF32 off for matmuls by default) plus the N x N score
matrix written and read once.
feature_swap is a gather: every output element reads ceil(P/s)^2 values (from L2 mostly) and
writes once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Dense peaks (TFLOP/s, TB/s) of the SXM parts; efficiencies are what an implicit GEMM without TMA
# reaches (tensor cores) and what cuBLAS SGEMM reaches (SIMT), taken as assumptions to be checked.
GPUS = {
    "H200": dict(tf32=495.0, bf16=989.0, fp32=67.0, hbm=4.8, l2=12.0),
    "H100": dict(tf32=495.0, bf16=989.0, fp32=67.0, hbm=3.35, l2=12.0),
    "A100": dict(tf32=156.0, bf16=312.0, fp32=19.5, hbm=2.0, l2=7.0),
}
# Triton: 128x128 wgmma tiles, software-pipelined; CUDA: 64x64 wmma (mma.sync) tiles, not pipelined.
TC_EFFICIENCY = {"triton": 0.5, "cuda": 0.25}
# Full tensor-core passes over all (query, key) pairs: max + collect in both.
TC_PASSES = {"triton": 2, "cuda": 2}
SIMT_EFFICIENCY = 0.7
MEM_EFFICIENCY = 0.7
OVERHEAD_S = 200e-6  # host work, norms, padding copies and launches of one patch_match call
SWAP_OVERHEAD_S = 20e-6
CHANNELS = 256
PATCH = 3
MAX_CANDIDATES = 32
# relu3_1 sizes (images are 4x larger): the benchmark shapes plus a 4K output.
SHAPES = {"cufed5": (83, 125), "1080p": (270, 480), "4k": (540, 960)}
LEVELS = {"relu3_1": (1, 256), "relu2_1": (2, 128), "relu1_1": (4, 64)}
PRECISIONS = ("highest", "high", "medium")


def _n(shape: str) -> int:
    h, w = SHAPES[shape]
    return (h - PATCH + 1) * (w - PATCH + 1)


def patch_match_seconds(shape: str, precision: str, provider: str, gpu: str = "H200") -> float:
    """Predicted best time of one patch_match call (query and key of the same size, C=256)."""
    g = GPUS[gpu]
    n = _n(shape)
    k = PATCH * PATCH * CHANNELS
    pass_flops = 2.0 * n * n * k
    if provider == "ttsr_bmm":
        compute = pass_flops / (g["fp32"] * 1e12 * SIMT_EFFICIENCY)
        matrix = 2.0 * n * n * 4  # the N x N fp32 scores, written by bmm and read by max
        return compute + matrix / (g["hbm"] * 1e12 * MEM_EFFICIENCY) + OVERHEAD_S
    peak = g["bf16"] if precision == "medium" else g["tf32"]
    scans = TC_PASSES[provider] * pass_flops / (peak * 1e12 * TC_EFFICIENCY[provider])
    # Re-scoring: each candidate is K fp32 loads of the key from L2 (the query row stays cached).
    rescore = n * MAX_CANDIDATES * k * 4 / (g["l2"] * 1e12 * MEM_EFFICIENCY)
    return scans + rescore + OVERHEAD_S


def feature_swap_seconds(shape: str, level: str, gpu: str = "H200") -> float:
    """Predicted best time of one feature_swap forward (mean) at ``level``."""
    g = GPUS[gpu]
    h, w = SHAPES[shape]
    scale, cv = LEVELS[level]
    out = cv * h * w * scale * scale
    taps = PATCH * PATCH  # windows covering a pixel at stride 1
    hbm = (2 * out + _n(shape)) * 4  # values read once, output written once, index
    l2 = out * taps * 4
    return (
        max(hbm / (g["hbm"] * 1e12 * MEM_EFFICIENCY), l2 / (g["l2"] * 1e12 * MEM_EFFICIENCY))
        + SWAP_OVERHEAD_S
    )


def predictions(gpu: str = "H200") -> list[dict]:
    """Every predicted row: {op, shape, provider, precision or level, seconds}."""
    rows = []
    for shape in SHAPES:
        for provider in ("cuda", "triton", "ttsr_bmm"):
            for precision in PRECISIONS if provider != "ttsr_bmm" else ("highest",):
                rows.append(
                    dict(
                        op="patch_match",
                        shape=shape,
                        provider=provider,
                        variant=precision,
                        seconds=patch_match_seconds(shape, precision, provider, gpu),
                    )
                )
    for shape in ("cufed5", "1080p"):
        for level in LEVELS:
            for provider in ("cuda", "triton"):
                rows.append(
                    dict(
                        op="feature_swap",
                        shape=shape,
                        provider=provider,
                        variant=level,
                        seconds=feature_swap_seconds(shape, level, gpu),
                    )
                )
    return rows


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def table(gpu: str) -> str:
    lines = [f"| op | shape | provider | precision / level | predicted ({gpu}) |", "|---|---|---|---|---|"]
    for r in predictions(gpu):
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['provider']} | {r['variant']} | {_fmt(r['seconds'])} |"
        )
    return "\n".join(lines)


def measured_rows(doc: dict) -> list[dict]:
    """(op, shape, provider, variant, features, best seconds, peak MB) of every benchmark in a JSON."""
    rows = []
    for b in doc.get("benchmarks", []):
        info = b.get("extra_info", {})
        name = b.get("name", "")
        op = (
            "patch_match"
            if name.startswith("test_patch_match")
            else ("feature_swap" if name.startswith("test_feature_swap") else None)
        )
        if op is None:
            continue
        variant = info.get("precision", "highest") if op == "patch_match" else info.get("level")
        rows.append(
            dict(
                op=op,
                shape=info.get("shape_name"),
                provider=info.get("backend"),
                variant=variant,
                features=info.get("features"),
                seconds=b["stats"]["min"],
                peak_mem_mb=info.get("peak_mem_mb"),
            )
        )
    return rows


def gpu_of(doc: dict) -> str:
    """The GPUS key matching the machine name in a benchmark JSON (H200 when none matches)."""
    machine = str(doc.get("srntt", {}).get("machine", ""))
    return next((g for g in GPUS if g in machine), "H200")


def compare(paths: list[Path]) -> str:
    lines = []
    for path in paths:
        doc = json.loads(Path(path).read_text())
        gpu = gpu_of(doc)
        pred = {(r["op"], r["shape"], r["provider"], r["variant"]): r["seconds"] for r in predictions(gpu)}
        lines.append(f"{path} (model: {gpu})")
        lines.append(
            f"{'op':<13} {'shape':<7} {'provider':<13} {'variant':<8} {'features':<7} "
            f"{'predicted':>10} {'measured':>10} {'meas/pred':>9} {'peak MB':>8}"
        )
        for m in measured_rows(doc):
            p = pred.get((m["op"], m["shape"], m["provider"], m["variant"]))
            ratio = f"{m['seconds'] / p:.2f}" if p else "-"
            peak = "-" if m["peak_mem_mb"] is None else f"{m['peak_mem_mb']:.0f}"
            lines.append(
                f"{m['op']:<13} {m['shape'] or '-':<7} {m['provider'] or '-':<13} {m['variant'] or '-':<8} "
                f"{m['features'] or '-':<7} {_fmt(p):>10} {_fmt(m['seconds']):>10} {ratio:>9} {peak:>8}"
            )
        lines += _goals(doc)
    return "\n".join(lines)


def _goals(doc: dict) -> list[str]:
    """The CUFED5 goal: the fused backends' best time against the TTSR fp32 bmm, same run."""
    best = {}
    for m in measured_rows(doc):
        if m["op"] == "patch_match" and m["shape"] == "cufed5" and m["variant"] == "highest":
            key = (m["provider"], m["features"])
            best[key] = min(best.get(key, math.inf), m["seconds"])
    out = []
    for (provider, features), seconds in sorted(best.items()):
        ttsr = best.get(("ttsr_bmm", features))
        if provider in ("cuda", "triton") and ttsr:
            out.append(
                f"goal: {provider} {features} cufed5 highest is {ttsr / seconds:.2f}x the TTSR bmm "
                f"(goal >= 5x)"
            )
    return out


def fake_json(path: Path) -> None:
    """A benchmark JSON with the layout benchmarks/conftest.py writes, timed by the model itself."""
    benchmarks = []
    for r in predictions("H200"):
        if r["shape"] == "4k":
            continue
        extra = dict(backend=r["provider"], shape_name=r["shape"], features="random", peak_mem_mb=1.0)
        extra["precision" if r["op"] == "patch_match" else "level"] = r["variant"]
        benchmarks.append(
            dict(
                name=f"test_{r['op']}[{r['provider']}-{r['variant']}]",
                stats=dict(min=r["seconds"] * 1.5),
                extra_info=extra,
            )
        )
    doc = dict(benchmarks=benchmarks, srntt=dict(machine="fake-NVIDIA-H200"))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="markdown table of the predictions")
    t.add_argument("--gpu", choices=sorted(GPUS), default="H200")
    c = sub.add_parser("compare", help="predicted next to measured")
    c.add_argument("json", nargs="+", type=Path)
    f = sub.add_parser("fake-json", help="write a fake benchmark JSON (dry runs)")
    f.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "table":
        print(table(args.gpu))
    elif args.cmd == "compare":
        missing = [str(p) for p in args.json if not p.is_file()]
        if missing:
            parser.error(f"json: no such file: {', '.join(missing)}")
        print(compare(args.json))
    else:
        fake_json(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
