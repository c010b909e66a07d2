"""Compile every GPU kernel for real targets without a GPU, and read its resources.

    python scripts/gpu_compile_check.py [--archs 80,90] [--subset] [--jobs N] [--only triton|cuda]
                                        [--out build/gpu-compile-check.json]

Triton: every kernel of kernels/ (patch-match scan in each mode the launcher runs, re-scoring, swap
forward and backward) for every autotune config the launcher offers on the arch and every
dtype/precision variant, compiled ahead of time with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))``. Registers and spill stack from ``cuobjdump -res-usage`` of
the cubin, shared memory from the compile metadata, tensor-core instructions counted in the PTX
(``mma.sync`` / ``wgmma.mma_async``).
CUDA: csrc/cuda/check/instantiate.cu (every kernel instantiation) with nvcc ``-Xptxas -v`` per
arch; registers, spills and shared memory from the ptxas report, tensor-core instructions from the
PTX of the same compile.

Writes a JSON list of rows {backend, kernel, arch, config, ok, registers, spills, smem_bytes,
tensor_core_instructions, tensor_core_expected, approx_divisions, int32_index_ops, error} and
prints them as a table. Fails (exit 1) when a build fails, a tensor-core kernel spills or has no
tensor-core instruction, a swap kernel divides approximately (its mean must round to nearest, as on
the CPU), the re-score kernel computes offsets in int32 (Triton IR), or a config needs more shared
memory than its arch has.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARCH_SMEM = {80: 163 << 10, 86: 99 << 10, 89: 99 << 10, 90: 227 << 10}
TC_PTX = re.compile(r"\b(?:mma\.sync|wmma\.mma\.sync|wgmma\.mma_async)\.")
# Not correctly rounded float32 division: `/` under --use_fast_math (CUDA) or by default (Triton).
APPROX_DIV_PTX = re.compile(r"\bdiv\.(?:approx|full)(?:\.ftz)?\.f32\b")
# Elementwise int32 products, quotients and remainders in the Triton IR: offset arithmetic that can
# wrap. NB: the re-score kernel's (row // Gqw) * stride * q_sy reaches 99% of 2^31 at an 8K relu1_1
# map, so it must have none; the collect scan's int32 candidate offsets are bounded by the host.
INT32_INDEX_TTIR = re.compile(r"arith\.(?:muli|divsi|remsi) .*: tensor<[0-9x]+xi32>")


def _row(backend, kernel, arch, config, **kw) -> dict:
    row = dict(
        backend=backend,
        kernel=kernel,
        arch=f"sm_{arch}",
        config=config,
        ok=False,
        registers=None,
        spills=None,
        smem_bytes=None,
        tensor_core_instructions=None,
        tensor_core_expected=False,
        approx_divisions=None,
        int32_index_ops=None,
        error=None,
    )
    row.update(kw)
    return row


# ---------------------------------------------------------------------------------------------
# Triton

_PTR = {"fp32": "*fp32", "fp64": "*fp64", "bf16": "*bf16", "fp16": "*fp16"}


def _signature(fn, ptrs: dict, meta: dict) -> dict:
    """Triton signature of ``fn``: the given pointer types, constexprs, and int32 for the other ints."""
    return {n: ptrs.get(n) or ("constexpr" if n in meta else "i32") for n in fn.arg_names}


def _variant(kernel, fn, ptrs, meta, options, config, tc) -> dict:
    return dict(
        kernel=kernel,
        fn=fn,
        signature=_signature(fn, ptrs, meta),
        constexprs=meta,
        options=options,
        config=config,
        tc=tc,
    )


def _scan_mode_variants(pm, arch, subset, label, q, low, acc, dot_prec, tc=True, **mode) -> list[dict]:
    """The scan kernel in one mode (collect, select, prune, fma, topk) for every config of ``arch``."""
    collect, prune, fma, topk = (mode.get(m, False) for m in ("collect", "prune", "fma", "topk"))
    ptrs = dict(
        q_ptr=_PTR[q],
        k_ptr=_PTR[q],
        ql_ptr=_PTR[low],
        kl_ptr=_PTR[low],
        qinv_ptr=_PTR[acc],
        kinv_ptr=_PTR[acc],
        best_val_ptr=_PTR[acc],
        best_idx_ptr="*i64",
        thr_ptr="*fp32" if collect or prune else _PTR[acc],
        count_ptr="*i32",
        cand_ptr="*i32",
        order_ptr="*i64",
        active_ptr="*i32",
    )
    meta = dict(
        P=3,
        COLLECT=collect,
        SELECT=mode.get("select", False),
        PRUNE=prune,
        KC=pm._MAX_CANDIDATES,
        DOT_PREC=dot_prec,
        UPCAST=False,
        FMA=fma,
        TOPK=int(topk),
        KP=pm.triton.next_power_of_2(max(topk, 2)) if topk else 1,
    )
    if fma:
        configs = [pm.fma_config(prune and low == "bf16")]
    else:
        operand_bytes = 2 if low == "bf16" else 4
        offered = pm.scan_configs(
            ARCH_SMEM[arch], operand_bytes, pm.scan_mode(collect, prune, topk > 0), (arch // 10, arch % 10)
        )
        configs = [pm._config_key(c) for c in offered]
    return [
        _variant(
            f"scan/{label}",
            pm._patch_match_scan_kernel,
            ptrs,
            {**meta, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
            dict(num_warps=warps, num_stages=stages),
            f"{bm}x{bn}x{bk} w{warps} s{stages}",
            tc,
        )
        for bm, bn, bk, warps, stages in (configs[-1:] if subset else configs)
    ]


def _scan_variants(pm, arch: int, subset: bool) -> list[dict]:
    """The scan kernel in every mode the launchers run: top-1 and top-k, float32 (TF32 / bf16
    candidates, float64 re-scan of overflowing queries) and float64."""
    rescan = dict(select=True, prune=True, fma=True)
    # float32 highest/high: TF32 candidates (max, collect), float64 re-scan of overflowing queries
    # (CUDA-core float64 dots where a TF32 dot finds candidates).
    modes = [
        ("max tf32", "fp32", "fp32", "fp32", "tf32", {}),
        ("collect tf32", "fp32", "fp32", "fp32", "tf32", dict(collect=True)),
        ("rescan fp64 tf32-prune", "fp32", "fp32", "fp64", "ieee", rescan),
    ]
    if not subset:
        modes += [
            # medium: bf16 candidates; its re-scan prunes with bf16 dots.
            ("max bf16", "bf16", "bf16", "fp32", "tf32", {}),
            ("collect bf16", "bf16", "bf16", "fp32", "tf32", dict(collect=True)),
            ("rescan fp64 bf16-prune", "fp32", "bf16", "fp64", "ieee", rescan),
            # SRNTT_TRITON_EXACT_FP32=1 and float64: no tensor cores by design.
            ("max ieee", "fp32", "fp32", "fp32", "ieee", dict(tc=False)),
            ("max fp64", "fp64", "fp64", "fp64", "ieee", dict(fma=True, tc=False)),
        ]
    # A running top-k holds (BLOCK_M, KP) values and indices, KP = k rounded up to a power of two:
    # the registers (and spills) depend on KP, so every KP the launcher can pick is built. k itself
    # only bounds a loop's trip count.
    kps = [pm.MAX_TOPK]
    if not subset:
        kps = [1 << i for i in range(1, pm.MAX_TOPK.bit_length())]
    topk_modes = [("tf32", "fp32", "fp32", "fp32", "tf32", {})]
    if not subset:
        topk_modes += [
            ("bf16", "bf16", "bf16", "fp32", "tf32", {}),
            ("rescan fp64 tf32-prune", "fp32", "fp32", "fp64", "ieee", rescan),
            ("rescan fp64 bf16-prune", "fp32", "bf16", "fp64", "ieee", rescan),
            ("fp64", "fp64", "fp64", "fp64", "ieee", dict(fma=True, tc=False)),
        ]
    modes += [
        (f"topk{k} {label}", *args, dict(mode, topk=k)) for k in kps for label, *args, mode in topk_modes
    ]
    return [v for *args, mode in modes for v in _scan_mode_variants(pm, arch, subset, *args, **mode)]


def _rescore_variants(pm, subset: bool) -> list[dict]:
    """The candidate re-scoring kernel: fp32 (top-1 and top-k lists) and the float64 near-tie pass."""
    out = []
    for f64 in (False, True):
        for kc in (pm._MAX_CANDIDATES, pm._MAX_CANDIDATES + pm.MAX_TOPK)[: 1 if subset else 2]:
            acc = _PTR["fp64" if f64 else "fp32"]
            ptrs = dict(
                q_ptr="*fp32",
                k_ptr="*fp32",
                qinv_ptr=acc,
                kinv_ptr=acc,
                best_val_ptr=acc,
                best_idx_ptr="*i64",
                count_ptr="*i32",
                cand_ptr="*i32",
                cscore_ptr=acc,
                sel_ptr="*i8",
            )
            meta = dict(P=3, KC=kc, F64=f64, BLOCK_M=pm._RESCORE_BLOCK_M, BLOCK_K=pm._RESCORE_BLOCK_K)
            out.append(
                _variant(
                    f"rescore{' fp64' if f64 else ''}{' topk' if kc > pm._MAX_CANDIDATES else ''}",
                    pm._patch_match_rescore_kernel,
                    ptrs,
                    meta,
                    dict(num_warps=4),
                    f"{meta['BLOCK_M']}x{meta['BLOCK_K']} w4",
                    False,
                )
            )
    return out


def _swap_variants(fs, subset: bool) -> list[dict]:
    """Swap forward, backward and the backward's chunk sums, per dtype and reduction."""
    import triton.language as tl

    out = []
    opts, config = dict(num_warps=fs._NUM_WARPS), f"{fs._BLOCK_PIX}x{fs._BLOCK_C}"
    blocks = dict(BLOCK_PIX=fs._BLOCK_PIX, BLOCK_C=fs._BLOCK_C)
    bwd_config = f"{fs._BLOCK_PIX}x{fs._BWD_BLOCK_C}"
    bwd_blocks = dict(BLOCK_PIX=fs._BLOCK_PIX, BLOCK_C=fs._BWD_BLOCK_C)
    for dt in ["fp32"] if subset else ["fp32", "fp64", "fp16", "bf16"]:
        acc = "fp64" if dt == "fp64" else "fp32"
        acc_tl = tl.float64 if dt == "fp64" else tl.float32
        for mean in (True,) if subset else (False, True):
            name = f"{dt}{' mean' if mean else ''}"
            fwd_ptrs = dict(v_ptr=_PTR[dt], idx_ptr="*i64", out_ptr=_PTR[acc])
            fwd_meta = dict(P=3, T=3, ACCUMULATE=True, MEAN=mean, ACC_DTYPE=acc_tl, **blocks)
            out.append(
                _variant(
                    f"swap_fwd/{name}", fs._feature_swap_fwd_kernel, fwd_ptrs, fwd_meta, opts, config, False
                )
            )
            bwd_ptrs = dict(
                grad_ptr=_PTR[dt],
                csr_ptr="*i64",
                cells_ptr="*i64",
                chunk_off_ptr="*i64",
                part_ptr=_PTR[acc],
                count_h_ptr="*i32",
                count_w_ptr="*i32",
                gv_ptr=_PTR[dt],
            )
            bwd_meta = dict(P=3, T=3, CHUNK=fs._CHUNK, MEAN=mean, ACC_DTYPE=acc_tl, **bwd_blocks)
            out.append(
                _variant(
                    f"swap_bwd/{name}", fs._feature_swap_bwd_kernel, bwd_ptrs, bwd_meta, opts, bwd_config,
                    False,
                )
            )
            # _signature looks names up: the backward's pointers cover the chunk kernel's but one.
            chunk_ptrs = dict(bwd_ptrs, chunk_key_ptr="*i64")
            chunk_meta = dict(WIN=12, CHUNK=fs._CHUNK, MEAN=mean, ACC_DTYPE=acc_tl, **blocks)
            out.append(
                _variant(
                    f"swap_bwd_chunk/{name}",
                    fs._feature_swap_bwd_chunk_kernel,
                    chunk_ptrs,
                    chunk_meta,
                    opts,
                    config,
                    False,
                )
            )
    return out


def triton_variants(arch: int, subset: bool) -> list[dict]:
    """Every (kernel, signature, constexprs, options) the launchers can run on ``arch``."""
    import srntt_core._triton  # noqa: F401  (registers the modules)

    pm = sys.modules["srntt_core._triton.patch_match"]
    fs = sys.modules["srntt_core._triton.feature_swap"]
    return _scan_variants(pm, arch, subset) + _rescore_variants(pm, subset) + _swap_variants(fs, subset)


_DIVISIBLE = {"C", "Cv", "q_sb", "q_sy", "k_sb", "k_sy"}


def _cuobjdump() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else shutil.which("cuobjdump")


def _res_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, spill stack bytes) of the single kernel in ``cubin``."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "-res-usage", f.name], capture_output=True, text=True, timeout=120
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def compile_triton(variant_index: int, arch: int, subset: bool) -> dict:
    """Compiles one variant (by index, so that worker processes rebuild the list themselves)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    v = triton_variants(arch, subset)[variant_index]
    row = _row("triton", v["kernel"], arch, v["config"], tensor_core_expected=v["tc"])
    # As Triton specializes a launch: tensors from torch are 16-byte aligned; channel counts and
    # the strides built from them (multiples of C = 64-256 at every SRNTT level) divide by 16.
    aligned = [
        i
        for i, n in enumerate(v["fn"].arg_names)
        if v["signature"].get(n, "").startswith("*") or n in _DIVISIBLE
    ]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    try:
        src = ASTSource(v["fn"], v["signature"], constexprs=v["constexprs"], attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=v["options"])
    except Exception as exc:  # a failed build is a result: reported in its row
        row["error"] = (
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        )
        return row
    regs, stack = _res_usage(k.asm["cubin"])
    row.update(
        ok=True,
        registers=regs,
        spills=stack,
        smem_bytes=int(k.metadata.shared),
        tensor_core_instructions=len(TC_PTX.findall(k.asm["ptx"])),
        approx_divisions=len(APPROX_DIV_PTX.findall(k.asm["ptx"])),
        int32_index_ops=len(INT32_INDEX_TTIR.findall(k.asm["ttir"])),
    )
    return row


def run_triton(archs: list[int], subset: bool, jobs: int, kernels: set[str] | None = None) -> list[dict]:
    tasks = [
        (i, a)
        for a in archs
        for i, v in enumerate(triton_variants(a, subset))
        if kernels is None or v["kernel"] in kernels
    ]
    with cf.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(
            pool.map(compile_triton, [i for i, _ in tasks], [a for _, a in tasks], [subset] * len(tasks))
        )


# ---------------------------------------------------------------------------------------------
# CUDA


def _nvcc() -> str | None:
    for cand in (
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


# As setup.py and torch.utils.cpp_extension compile the extension (scripts/cuda_check.sh too).
NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "-DNDEBUG",
    "--use_fast_math",
    "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
_PTXAS_FN = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out, strict=False)) if len(out) == len(names) else {n: n for n in names}


def _short(demangled: str) -> str:
    """``match_tc_kernel<true, (TcPass)1>`` from a full demangled signature: the name up to its
    parameter list (the first '(' outside the template arguments), without our namespace."""
    depth = 0
    for i, ch in enumerate(demangled):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0:
            demangled = demangled[:i]
            break
    return demangled.replace("srntt::cuda_kernels::", "").removeprefix("void ").strip()


def _nvcc_compile(nvcc: str, src: Path, arch: int, tmp: str) -> tuple:
    """(ptxas -v object compile result, PTX text) of ``src`` for ``arch``."""
    common = [nvcc, *NVCC_FLAGS, f"-I{ROOT / 'csrc'}"]
    obj = subprocess.run(
        [
            *common,
            "-c",
            "-gencode",
            f"arch=compute_{arch},code=sm_{arch}",
            "-Xptxas",
            "-v",
            str(src),
            "-o",
            f"{tmp}/i{arch}.o",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    ptx = subprocess.run(
        [*common, "-ptx", f"-arch=compute_{arch}", str(src), "-o", f"{tmp}/i{arch}.ptx"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    return obj, Path(f"{tmp}/i{arch}.ptx").read_text() if ptx.returncode == 0 else ""


def _ptxas_report(stderr: str) -> dict[str, dict]:
    """Per mangled entry function: registers, spills (store + load bytes), stack, smem."""
    fns, cur = {}, None
    for line in stderr.splitlines():
        m = _PTXAS_FN.search(line)
        if m:
            cur = m.group(1)
            fns[cur] = {}
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            fns[cur]["spills"] = int(m.group(2)) + int(m.group(3))
            fns[cur]["stack"] = int(m.group(1))
        m = _PTXAS_USED.search(line)
        if m:
            fns[cur]["registers"] = int(m.group(1))
            fns[cur]["smem"] = int(m.group(2) or 0)
    return fns


def _cuda_rows(arch: int, obj, ptx_text: str) -> list[dict]:
    if obj.returncode != 0:
        tail = [ln for ln in obj.stderr.splitlines() if "error" in ln][:3] or obj.stderr.splitlines()[-3:]
        return [_row("cuda", "instantiate.cu", arch, "-", error=" | ".join(tail))]
    # Per entry function in the PTX: the text up to the next entry, for the tensor-core count.
    entries = list(re.finditer(r"\.entry (\S+)\(", ptx_text))
    bodies = {
        m.group(1): ptx_text[m.end() : entries[i + 1].start() if i + 1 < len(entries) else None]
        for i, m in enumerate(entries)
    }
    fns = _ptxas_report(obj.stderr)
    names = _demangle(list(fns))
    rows = []
    for mangled, info in fns.items():
        kernel = _short(names[mangled])
        rows.append(
            _row(
                "cuda",
                kernel,
                arch,
                "-",
                ok=True,
                registers=info.get("registers"),
                spills=info.get("spills"),
                smem_bytes=info.get("smem"),
                tensor_core_instructions=len(TC_PTX.findall(bodies.get(mangled, ""))),
                approx_divisions=len(APPROX_DIV_PTX.findall(bodies.get(mangled, ""))),
                tensor_core_expected="match_tc_kernel" in kernel,
            )
        )
    return rows


def run_cuda(archs: list[int]) -> list[dict]:
    nvcc = _nvcc()
    if nvcc is None:
        return [_row("cuda", "instantiate.cu", a, "-", error="nvcc not found") for a in archs]
    src = ROOT / "csrc" / "cuda" / "check" / "instantiate.cu"
    with tempfile.TemporaryDirectory() as tmp, cf.ThreadPoolExecutor(max_workers=len(archs)) as pool:
        results = list(pool.map(lambda a: (a, *_nvcc_compile(nvcc, src, a, tmp)), archs))
    return [row for arch, obj, ptx_text in results for row in _cuda_rows(arch, obj, ptx_text)]


# ---------------------------------------------------------------------------------------------


def problems(rows: list[dict]) -> list[str]:
    """Why the check fails (empty when it passes)."""
    out = []
    for r in rows:
        what = f"{r['backend']} {r['kernel']} {r['arch']} {r['config']}"
        limit = ARCH_SMEM.get(int(r["arch"].removeprefix("sm_")))
        if not r["ok"]:
            out.append(f"{what}: build failed: {r['error']}")
            continue
        if r["tensor_core_expected"]:
            if r["spills"]:
                out.append(f"{what}: tensor-core kernel spills {r['spills']} bytes")
            if not r["tensor_core_instructions"]:
                out.append(f"{what}: tensor-core kernel has no mma/wgmma instruction")
        if "swap" in r["kernel"] and r.get("approx_divisions"):
            out.append(f"{what}: swap kernel divides approximately ({r['approx_divisions']} div.approx/full)")
        if r["kernel"].startswith("rescore") and r.get("int32_index_ops"):
            out.append(f"{what}: re-score kernel has {r['int32_index_ops']} int32 offset operations")
        if limit is not None and r["smem_bytes"] is not None and r["smem_bytes"] > limit:
            out.append(f"{what}: needs {r['smem_bytes']} bytes of shared memory > {limit} on {r['arch']}")
    return out


def table(rows: list[dict]) -> str:
    head = (
        f"{'backend':<7} {'kernel':<36} {'arch':<6} {'config':<20} {'ok':<3} {'regs':>5} {'spill':>6} "
        f"{'smem':>7} {'tc':>5} {'adiv':>4} {'i32':>4}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:

        def cell(v):
            return "-" if v is None else str(v)

        tc = cell(r["tensor_core_instructions"]) + ("*" if r["tensor_core_expected"] else "")
        lines.append(
            f"{r['backend']:<7} {r['kernel'][:36]:<36} {r['arch']:<6} {r['config'][:20]:<20} "
            f"{'yes' if r['ok'] else 'NO':<3} {cell(r['registers']):>5} {cell(r['spills']):>6} "
            f"{cell(r['smem_bytes']):>7} {tc:>5} {cell(r.get('approx_divisions')):>4} "
            f"{cell(r.get('int32_index_ops')):>4}"
        )
    lines.append(
        "tc: mma/wgmma instructions in the PTX; * = a tensor-core kernel (must have some, no spills); "
        "adiv: approximate float32 divisions in the PTX (none in a swap kernel); "
        "i32: int32 elementwise mul/div/rem in the Triton IR (none in the re-score kernel)"
    )
    return "\n".join(lines)


def _archs(text: str) -> list[int]:
    try:
        archs = [int(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 80,90, got {text!r}"
        ) from None
    bad = [a for a in archs if a not in ARCH_SMEM]
    if not archs or bad:
        raise argparse.ArgumentTypeError(f"archs must be among {sorted(ARCH_SMEM)}, got {text!r}")
    return archs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", type=_archs, default=[80, 90], help="compute capabilities (default 80,90)")
    parser.add_argument("--subset", action="store_true", help="one config per fp32 kernel mode (quick)")
    parser.add_argument("--only", choices=("triton", "cuda"), help="one backend only")
    parser.add_argument("--kernels", help="comma-separated Triton kernel names to compile (default: all)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-compile-check.json")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs: must be >= 1")
    rows = []
    if args.only != "cuda":
        wanted = {k.strip() for k in args.kernels.split(",")} if args.kernels else None
        rows += run_triton(args.archs, args.subset, args.jobs, wanted)
    if args.only != "triton":
        rows += run_cuda(args.archs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    bad = problems(rows)
    for p in bad:
        print(f"FAIL: {p}")
    print(f"gpu-compile-check: {len(rows)} builds, {len(bad)} problems; {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    # The kernels are compiled for a GPU, not run by the interpreter (which also changes their
    # tiles). NB: only when run as a script: a test session that imports this module keeps its
    # interpreter for the Triton tests.
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
