#!/usr/bin/env bash
# One prepared GPU run: versions, build, the cuda/triton tests, compute-sanitizer memcheck, the
# benchmark subset with every peer that runs on a GPU, and the performance model's predictions next
# to the measurements. Every stage is capped with `timeout` and the whole run with a time budget,
# so a hang in one stage still leaves the others' results.
#
#   bash scripts/gpu_check.sh [--dry-run] [--skip-build] [--out DIR] [--data DIR] [--budget SECONDS]
#
#   --out DIR     results folder (default: $GPU_CHECK_OUT, else build/gpu-check): logs, junit XML,
#                 sanitizer output, benchmark JSON, summary. With $OUT set (the device tool's return
#                 folder, which brings back at most 8 files) it is also packed into
#                 $OUT/gpu-check.tgz, next to summary.txt and predicted_vs_measured.txt
#   --data DIR    dataset folder with images/Sun80/ for the real-feature benchmarks (exported as
#                 SRNTT_DATA; without it those cases skip and the random-feature ones run)
#   --dry-run     on any machine: parse, create the folders, print every command with its time cap,
#                 check that pytest collects the selections, and run the comparison on a fake
#                 benchmark JSON; runs nothing on a GPU
#   --budget S    wall-clock budget of the whole run (default 400 s); each stage gets
#                 min(its cap, what is left)
#
# Benchmark JSON also goes to benchmarks/results/<gpu-name>/ (name from srntt_core.cli.machine).
# Exit status: 0 when every stage passed, 1 otherwise (each stage's status is in summary.txt).
set -u
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

DRY=0
SKIP_BUILD=0
RESULTS=""
DATA_DIR=""
BUDGET="${GPU_CHECK_BUDGET:-400}"
usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check: --out needs a folder" >&2; exit 2; }; RESULTS="$2"; shift ;;
    --data) [ $# -ge 2 ] || { echo "gpu_check: --data needs a folder" >&2; exit 2; }; DATA_DIR="$2"; shift ;;
    --budget)
      [ $# -ge 2 ] && [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -gt 0 ] || { echo "gpu_check: --budget needs a positive integer (seconds)" >&2; exit 2; }
      BUDGET="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$RESULTS" ]; then
  if [ -n "${GPU_CHECK_OUT:-}" ]; then RESULTS="$GPU_CHECK_OUT"
  else RESULTS=build/gpu-check; fi
fi
if [ -n "$DATA_DIR" ]; then
  [ -d "$DATA_DIR" ] || { echo "gpu_check: --data: no such folder '$DATA_DIR'" >&2; exit 2; }
  export SRNTT_DATA="$(cd "$DATA_DIR" && pwd)"
fi
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"

PY="${PYTHON:-python3}"
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
START=$(date +%s)
SUMMARY="$RESULTS/summary.txt"
: >"$SUMMARY"
STATUS=0

left() { echo $((BUDGET - ($(date +%s) - START))); }

# stage NAME CAP LOG CMD...: runs CMD under `timeout min(CAP, budget left)`, output to LOG.
stage() {
  local name="$1" cap="$2" log="$3"
  shift 3
  local t
  t=$(left)
  [ "$t" -gt "$cap" ] && t=$cap
  if [ $DRY -eq 1 ]; then
    echo "[dry-run] $name (cap ${cap}s) > $log: $*"
    echo "$name: dry-run" >>"$SUMMARY"
    return 0
  fi
  if [ "$t" -lt 5 ]; then
    echo "$name: SKIPPED (time budget of ${BUDGET}s spent)" | tee -a "$SUMMARY"
    STATUS=1
    return 1
  fi
  echo "== $name (cap ${t}s) -> $log"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" >"$log" 2>&1
  rc=$?
  local msg="rc=$rc, $(( $(date +%s) - t0 ))s"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && msg="$msg, TIMED OUT"
  echo "$name: $msg" | tee -a "$SUMMARY"
  tail -n 5 "$log" | sed 's/^/    /'
  [ $rc -eq 0 ] || STATUS=1
  return $rc
}

echo "gpu_check: results in $RESULTS (budget ${BUDGET}s)${SRNTT_DATA:+, data $SRNTT_DATA}"

# 0. versions
{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('device', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -n 1
} >"$RESULTS/versions.txt" 2>&1
cat "$RESULTS/versions.txt"

# 1. build (the CUDA kernels for this GPU's arch; the caller may override TORCH_CUDA_ARCH_LIST)
if [ $SKIP_BUILD -eq 0 ]; then
  ARCH="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null || echo 9.0)}"
  stage build 120 "$RESULTS/build.log" env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install --no-build-isolation --no-deps -e .
  [ $DRY -eq 1 ] || "$PY" -c "import srntt_core; print(srntt_core.build_info())" >>"$RESULTS/build.log" 2>&1
fi

# 2. the CUDA and Triton parametrizations of the test suite. With pytest-xdist a crash (segfault)
# takes one worker, not the run; -rA names every test, so a timeout still leaves the names.
TEST_SEL=(-m "cuda or triton")
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rA)
# -v: one line per finished test, so a timeout still leaves the names; the slowest are listed.
PYTEST_V=("$PY" -m pytest -v -p no:cacheprovider -rfE --durations=15)
PER_TEST=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST+=(--timeout=90)
PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && PARALLEL+=(-n "${GPU_CHECK_WORKERS:-8}")
stage tests 130 "$RESULTS/tests.log" env PYTHONUNBUFFERED=1 "${PYTEST_V[@]}" "${PARALLEL[@]}" "${PER_TEST[@]}" \
  tests "${TEST_SEL[@]}" --junitxml="$RESULTS/tests.xml"

# 3. benchmarks: every provider at CUFED5 size (all precisions); after the memcheck, the fused GPU
# backends and the TTSR bmm at 1080p (random features)
MACHINE="$("$PY" -m srntt_core.cli.machine 2>/dev/null || echo unknown)"
BENCH_DIR="benchmarks/results/$MACHINE"
[ $DRY -eq 1 ] || mkdir -p "$BENCH_DIR"
BENCH=("$PY" -m pytest -q -p no:cacheprovider -rs benchmarks/bench_patch_match.py benchmarks/bench_feature_swap.py
       --benchmark-only)
# pytest-benchmark writes its JSON at the end of a run: two runs, so that a timeout loses one half.
stage bench_cufed5 75 "$RESULTS/bench_cufed5.log" env SRNTT_BENCH_SHAPES=cufed5 \
  SRNTT_BENCH_PRECISIONS=highest,high,medium "${BENCH[@]}" -k "test_patch_match" \
  --benchmark-json="$BENCH_DIR/gpu_check_cufed5.json"
stage bench_swap_cufed5 40 "$RESULTS/bench_swap_cufed5.log" env SRNTT_BENCH_SHAPES=cufed5 \
  "${BENCH[@]}" -k "test_feature_swap and not python_loop" \
  --benchmark-json="$BENCH_DIR/gpu_check_swap_cufed5.json"

# 4. compute-sanitizer memcheck on a small subset of the CUDA tests (caching allocator off, so an
# out-of-bounds access inside a cached block is seen)
MEMCHECK_SEL=(tests/test_cuda_backend.py -m cuda -k "zero_patches or many_tiles or many_references or one_hot_key or float16")
stage memcheck 60 "$RESULTS/memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
  compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 50 \
  "${PYTEST[@]}" "${PER_TEST[@]}" "${MEMCHECK_SEL[@]}" --junitxml="$RESULTS/memcheck.xml"

# 5. the 1080p benchmarks
stage bench_1080p 45 "$RESULTS/bench_1080p.log" env SRNTT_BENCH_SHAPES=1080p SRNTT_BENCH_LARGE=1 \
  SRNTT_BENCH_PRECISIONS=highest "${BENCH[@]}" -k "random and (cuda or triton or ttsr_bmm)" \
  --benchmark-json="$BENCH_DIR/gpu_check_1080p.json"

# 6. predictions next to measurements
if [ $DRY -eq 1 ]; then
  # The dry run checks that pytest accepts the selections (collection only) and that the
  # comparison reads a benchmark JSON of the real layout.
  "${PYTEST[@]}" --collect-only tests "${TEST_SEL[@]}" >"$RESULTS/collect_tests.log" 2>&1 \
    || { echo "collect tests: FAILED (see $RESULTS/collect_tests.log)" | tee -a "$SUMMARY"; STATUS=1; }
  "${PYTEST[@]}" --collect-only "${MEMCHECK_SEL[@]}" >"$RESULTS/collect_memcheck.log" 2>&1 \
    || { echo "collect memcheck: FAILED" | tee -a "$SUMMARY"; STATUS=1; }
  SRNTT_BENCH_SHAPES=cufed5 SRNTT_BENCH_PRECISIONS=highest,high,medium "${BENCH[@]}" --collect-only \
    -k "test_patch_match or (test_feature_swap and not python_loop)" >"$RESULTS/collect_bench.log" 2>&1 \
    || { echo "collect bench: FAILED" | tee -a "$SUMMARY"; STATUS=1; }
  "$PY" scripts/gpu_perf.py fake-json "$RESULTS/fake_bench.json" >/dev/null
  JSONS=("$RESULTS/fake_bench.json")
else
  JSONS=()
  for f in "$BENCH_DIR"/gpu_check_cufed5.json "$BENCH_DIR"/gpu_check_swap_cufed5.json \
           "$BENCH_DIR"/gpu_check_1080p.json; do
    [ -f "$f" ] && cp "$f" "$RESULTS/" && JSONS+=("$f")
  done
fi
if [ ${#JSONS[@]} -gt 0 ]; then
  "$PY" scripts/gpu_perf.py compare "${JSONS[@]}" >"$RESULTS/predicted_vs_measured.txt" 2>&1 \
    || { echo "compare: FAILED" | tee -a "$SUMMARY"; STATUS=1; }
  cat "$RESULTS/predicted_vs_measured.txt"
else
  echo "compare: no benchmark JSON" | tee -a "$SUMMARY"
  STATUS=1
fi

echo "== summary ($(( $(date +%s) - START ))s)"
cat "$SUMMARY"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ "$RESULTS" != "$(cd "$OUT" && pwd)" ]; then
  # The device tool returns at most 8 files from $OUT: one archive and the two short reports.
  tar czf "$OUT/gpu-check.tgz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" -C "$ROOT" "$BENCH_DIR" 2>/dev/null
  cp "$SUMMARY" "$OUT/" 2>/dev/null
  [ -f "$RESULTS/predicted_vs_measured.txt" ] && cp "$RESULTS/predicted_vs_measured.txt" "$OUT/"
  echo "gpu_check: packed into $OUT/gpu-check.tgz"
fi
[ $STATUS -eq 0 ] && echo "gpu_check: OK" || echo "gpu_check: FAILED"
exit $STATUS
