"""The GPU tooling, checked on the CPU: scripts/gpu_check.sh's dry run, the performance model's
comparison, the compile check's verdicts, and the per-arch autotune configs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_compile_check  # noqa: E402
import gpu_perf  # noqa: E402


def _run(*args, **kw):
    env = {**__import__("os").environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=kw.get("timeout", 900),
    )


def test_gpu_check_dry_run(tmp_path):
    result = _run("--dry-run", "--out", str(tmp_path / "res"), "--skip-build")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (tmp_path / "res" / "summary.txt").read_text().splitlines()
    assert summary == [
        "tests: dry-run",
        "bench_cufed5: dry-run",
        "bench_swap_cufed5: dry-run",
        "bench_pipeline_cufed5: dry-run",
        "memcheck: dry-run",
        "bench_1080p: dry-run",
    ]
    # Every selection collects something, and the comparison read the fake benchmark JSON.
    for name in ("collect_tests", "collect_memcheck", "collect_bench"):
        log = (tmp_path / "res" / f"{name}.log").read_text()
        assert " collected" in log or "tests collected" in log or "test_" in log, log[-2000:]
    compared = (tmp_path / "res" / "predicted_vs_measured.txt").read_text()
    assert "patch_match   cufed5  triton" in compared and "1.50" in compared
    assert "goal: triton random cufed5 highest" in compared
    assert "[dry-run] tests" in result.stdout and "-m cuda or triton" in result.stdout
    assert "gpu_check_cufed5.json" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "soon"], "--budget needs a positive integer"),
        (["--out"], "--out needs a folder"),
        (["--data", "/nonexistent/srntt-data"], "--data: no such folder"),
        (["--frobnicate"], "unknown argument '--frobnicate'"),
    ],
)
def test_gpu_check_rejects_bad_arguments(args, message):
    result = _run(*args, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_perf_compare_reads_benchmark_json(tmp_path):
    doc = {
        "srntt": {"machine": "NVIDIA-H100-80GB-HBM3"},
        "benchmarks": [
            {
                "name": "test_patch_match[cufed5-real-cuda-high]",
                "stats": {"min": 0.010},
                "extra_info": {
                    "backend": "cuda",
                    "shape_name": "cufed5",
                    "features": "real",
                    "precision": "high",
                    "peak_mem_mb": 12.0,
                },
            },
            {
                "name": "test_patch_match[cufed5-real-ttsr_bmm-highest]",
                "stats": {"min": 0.030},
                "extra_info": {
                    "backend": "ttsr_bmm",
                    "shape_name": "cufed5",
                    "features": "real",
                    "precision": "highest",
                    "peak_mem_mb": None,
                },
            },
            {
                "name": "test_patch_match[cufed5-real-cuda-highest]",
                "stats": {"min": 0.005},
                "extra_info": {
                    "backend": "cuda",
                    "shape_name": "cufed5",
                    "features": "real",
                    "precision": "highest",
                },
            },
            {
                "name": "test_feature_swap[cufed5-real-relu1_1-triton]",
                "stats": {"min": 1e-4},
                "extra_info": {
                    "backend": "triton",
                    "shape_name": "cufed5",
                    "features": "real",
                    "level": "relu1_1",
                },
            },
            {"name": "test_compat_something", "stats": {"min": 1.0}, "extra_info": {}},
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    text = gpu_perf.compare([path])
    assert "(model: H100)" in text
    predicted = gpu_perf.patch_match_seconds("cufed5", "high", "cuda", "H100")
    assert f"{0.010 / predicted:.2f}" in text
    assert "feature_swap  cufed5  triton        relu1_1" in text
    assert "compat" not in text
    assert "goal: cuda real cufed5 highest is 6.00x the TTSR bmm" in text


def test_perf_model_orders():
    # bf16 candidates are cheaper than TF32 ones; the fp32 SIMT bmm is slower than either; time grows
    # with the square of the patch count.
    for provider in ("cuda", "triton"):
        assert (
            gpu_perf.patch_match_seconds("cufed5", "medium", provider)
            < gpu_perf.patch_match_seconds("cufed5", "highest", provider)
            < gpu_perf.patch_match_seconds("cufed5", "highest", "ttsr_bmm")
        )
    assert gpu_perf.patch_match_seconds("4k", "highest", "triton") > 10 * gpu_perf.patch_match_seconds(
        "1080p", "highest", "triton"
    )
    table = gpu_perf.table("H200")
    assert table.count("\n") + 1 == 2 + len(gpu_perf.predictions("H200"))


def test_perf_cli_rejects_missing_json(tmp_path):
    with pytest.raises(SystemExit):
        gpu_perf.main(["compare", str(tmp_path / "missing.json")])


def _row(**kw):
    row = dict(
        backend="triton",
        kernel="scan/max tf32",
        arch="sm_90",
        config="128x64x64",
        ok=True,
        registers=200,
        spills=0,
        smem_bytes=100_000,
        tensor_core_instructions=16,
        tensor_core_expected=True,
        error=None,
    )
    row.update(kw)
    return row


@pytest.mark.parametrize(
    "row, problem",
    [
        (_row(), None),
        (_row(spills=208), "spills 208 bytes"),
        (_row(tensor_core_instructions=0), "no mma/wgmma"),
        (_row(tensor_core_expected=False, tensor_core_instructions=0, spills=16), None),
        (_row(arch="sm_80", smem_bytes=170_000), "shared memory > 166912"),
        (_row(arch="sm_86", smem_bytes=110_000, tensor_core_expected=False), "shared memory > 101376"),
        (_row(ok=False, error="CompilationError: boom"), "build failed: CompilationError: boom"),
        (_row(kernel="swap_fwd/fp32 mean", tensor_core_expected=False, approx_divisions=1), "divides approx"),
        (_row(kernel="scan/max tf32", approx_divisions=1), None),
        (_row(kernel="rescore fp64", tensor_core_expected=False, int32_index_ops=2), "2 int32 offset"),
        (_row(kernel="scan/collect tf32", int32_index_ops=2), None),
    ],
)
def test_compile_check_verdicts(row, problem):
    found = gpu_compile_check.problems([row])
    if problem is None:
        assert found == []
    else:
        assert len(found) == 1 and problem in found[0], found


def test_compile_check_rejects_bad_archs():
    with pytest.raises(SystemExit):
        gpu_compile_check.main(["--archs", "75"])
    with pytest.raises(SystemExit):
        gpu_compile_check.main(["--archs", "nine"])


def test_compile_check_names_cuda_kernels_by_their_template_arguments():
    # Template arguments may hold parentheses, e.g. an enum cast: the name ends at the parameter list.
    ns = "srntt::cuda_kernels::"
    sig = f"void {ns}match_tc_kernel<false, ({ns}TcPass)2>(float const*, int)"
    assert gpu_compile_check._short(sig) == "match_tc_kernel<false, (TcPass)2>"
    assert gpu_compile_check._short(f"void {ns}merge_kernel<double>(double*)") == "merge_kernel<double>"


@pytest.mark.triton
def test_compile_check_builds_every_topk_state_width():
    """A running top-k's registers depend on its state width KP (k rounded up to a power of two):
    every top-k scan mode is built for every KP that some k in [1, MAX_TOPK] gets."""
    triton = pytest.importorskip("triton")
    import srntt_core._triton as kernels

    if not kernels.AVAILABLE:
        pytest.skip(kernels.UNAVAILABLE_REASON)
    pm = sys.modules["srntt_core._triton.patch_match"]
    want = {triton.next_power_of_2(max(k, 2)) for k in range(1, pm.MAX_TOPK + 1)}
    widths = {}
    for v in gpu_compile_check.triton_variants(80, subset=False):
        if v["constexprs"].get("TOPK"):
            mode = v["kernel"].split(" ", 1)[1]
            widths.setdefault(mode, set()).add(v["constexprs"]["KP"])
    assert {"tf32", "bf16", "rescan fp64 tf32-prune", "rescan fp64 bf16-prune", "fp64"} <= set(widths)
    assert all(kp == want for kp in widths.values()), widths


@pytest.mark.triton
def test_scan_configs_fit_each_arch():
    pytest.importorskip("triton")
    import srntt_core._triton as kernels

    if not kernels.AVAILABLE:
        pytest.skip(kernels.UNAVAILABLE_REASON)
    pm = sys.modules["srntt_core._triton.patch_match"]
    for arch, limit in gpu_compile_check.ARCH_SMEM.items():
        assert pm.SMEM_LIMITS[(arch // 10, arch % 10)] == limit
        for operand_bytes in (2, 4):
            for mode in pm.SCAN_CONFIGS:
                configs = pm.scan_configs(limit, operand_bytes, mode)
                assert configs and pm._config_key(configs[0]) == pm.SCAN_CONFIGS[mode][0]
                for c in configs[1:]:
                    assert (
                        pm.scan_smem_bytes(*pm._config_key(c)[:3], c.num_stages, operand_bytes, mode) <= limit
                    )
    assert len(pm.scan_configs(99 << 10, 4, "max")) < len(pm.scan_configs(227 << 10, 4, "max"))


@pytest.mark.slow
def test_gpu_compile_check_subset(tmp_path):
    """Triton kernels compiled ahead of time for sm_90: the tensor-core scans (collect, running
    top-64) have mma/wgmma instructions and no spills, the re-score kernel builds, the swap mean
    divides rounding to nearest, the re-score offsets are 64-bit (a representative subset of
    `make gpu-compile-check`)."""
    pytest.importorskip("triton")
    out = tmp_path / "check.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_compile_check.py"),
            "--subset",
            "--archs",
            "90",
            "--only",
            "triton",
            "--kernels",
            "scan/collect tf32,scan/topk64 tf32,rescore,swap_fwd/fp32 mean,swap_bwd/fp32 mean",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    rows = json.loads(out.read_text())
    kernels = {"scan/collect tf32", "scan/topk64 tf32", "rescore", "swap_fwd/fp32 mean", "swap_bwd/fp32 mean"}
    assert {r["kernel"] for r in rows} == kernels, result.stdout + result.stderr
    assert result.returncode == 0, result.stdout
    for scan in (r for r in rows if r["kernel"].startswith("scan/")):
        assert scan["tensor_core_instructions"] > 0 and scan["spills"] == 0, scan
    assert all(r["approx_divisions"] == 0 for r in rows if r["kernel"].startswith("swap")), rows
    assert all(r["int32_index_ops"] == 0 for r in rows if r["kernel"].startswith("rescore")), rows
