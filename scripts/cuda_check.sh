#!/usr/bin/env bash
# Compiles every torch-free CUDA kernel header (csrc/cuda/*.cuh) with this machine's nvcc for sm_80
# and sm_90, through csrc/cuda/check/instantiate.cu (which instantiates every kernel and launcher),
# then builds and runs csrc/cuda/check/host_check.cu: the kernels' index math on the CPU against
# brute force (needs no GPU). The *_binding.cu files include torch and are built by setup.py only.
# With --bindings it also compiles (no link) the *_binding.cu files against the installed torch's
# headers, as setup.py would; a CPU build of torch lacks a few CUDA-side headers, for which
# csrc/cuda/check/torch_stubs stands in (slow: minutes; not part of `make test`).
# Exit status: 0 when everything compiled and passed, or when there is nothing to check (no nvcc,
# no .cuh); 1 otherwise.
set -u
cd "$(dirname "$0")/.."
BINDINGS=0
[ "${1:-}" = "--bindings" ] && BINDINGS=1

NVCC=""
if command -v nvcc >/dev/null 2>&1; then
  NVCC="$(command -v nvcc)"
elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  NVCC="$CUDA_HOME/bin/nvcc"
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  NVCC=/usr/local/cuda/bin/nvcc
fi
if [ -z "$NVCC" ]; then
  echo "cuda_check: nvcc not found (PATH, \$CUDA_HOME, /usr/local/cuda): nothing checked"
  exit 0
fi

shopt -s nullglob
HEADERS=(csrc/cuda/*.cuh)
if [ ${#HEADERS[@]} -eq 0 ]; then
  echo "cuda_check: no csrc/cuda/*.cuh kernel headers: nothing to compile"
  exit 0
fi

INSTANTIATE=csrc/cuda/check/instantiate.cu
HOST_CHECK=csrc/cuda/check/host_check.cu
status=0
for h in "${HEADERS[@]}"; do
  if ! grep -q "#include \"../$(basename "$h")\"" "$INSTANTIATE"; then
    echo "cuda_check: $h is not included by $INSTANTIATE (add it, and instantiate its templates)"
    status=1
  fi
done

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "cuda_check: $("$NVCC" --version | tail -n 1)"
echo "cuda_check: headers: ${HEADERS[*]}"
# As setup.py and torch.utils.cpp_extension (COMMON_NVCC_FLAGS) compile the extension.
FLAGS=(-std=c++17 -O3 -DNDEBUG --use_fast_math --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__
       -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -Icsrc)

# The two compilations are independent: run them side by side.
"$NVCC" "${FLAGS[@]}" -c -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
  "$INSTANTIATE" -o "$TMP/instantiate.o" >"$TMP/instantiate.log" 2>&1 &
pid_inst=$!
# Host code only matters here, so the device side stops at PTX (no ptxas).
"$NVCC" "${FLAGS[@]}" -gencode arch=compute_80,code=compute_80 "$HOST_CHECK" -o "$TMP/host_check" \
  >"$TMP/host_check.log" 2>&1 &
pid_host=$!

if wait "$pid_inst"; then
  echo "cuda_check: compiled $INSTANTIATE for sm_80, sm_90 (every kernel and launcher, float and double)"
else
  echo "cuda_check: FAILED to compile $INSTANTIATE:"
  cat "$TMP/instantiate.log"
  status=1
fi
if wait "$pid_host"; then
  echo "cuda_check: compiled $HOST_CHECK; running it (CPU only):"
  "$TMP/host_check" >"$TMP/host_check.out" 2>&1
  rc=$?
  sed 's/^/  /' "$TMP/host_check.out"
  [ $rc -eq 0 ] || status=1
else
  echo "cuda_check: FAILED to compile $HOST_CHECK:"
  cat "$TMP/host_check.log"
  status=1
fi

if [ $BINDINGS -eq 1 ]; then
  PY=python3
  [ -x .venv/bin/python ] && PY=.venv/bin/python
  if ! TORCH_INC="$("$PY" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))' 2>/dev/null)"; then
    echo "cuda_check: --bindings: torch not importable with $PY"
    status=1
  else
    PY_INC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    INC=()
    for d in $TORCH_INC; do INC+=(-I"$d"); done
    INC+=(-I"$PY_INC")
    CUDA_INC="$(dirname "$(dirname "$NVCC")")/include"
    # Stubs only for what is missing (they come last, after the real torch include dirs).
    if [ ! -f "$CUDA_INC/cublas_v2.h" ] || ! "$PY" -c 'import torch, os, sys; sys.exit(not os.path.isfile(os.path.join(os.path.dirname(torch.__file__), "include/c10/cuda/impl/cuda_cmake_macros.h")))'; then
      INC+=(-Icsrc/cuda/check/torch_stubs)
      echo "cuda_check: --bindings: using csrc/cuda/check/torch_stubs for missing cuBLAS/cuSPARSE/c10 headers"
    fi
    # setup.py's nvcc flags plus torch.utils.cpp_extension.COMMON_NVCC_FLAGS.
    BFLAGS=("${FLAGS[@]}" -DSRNTT_WITH_CUDA=1 -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
            -diag-suppress 3306)
    for f in csrc/cuda/*_binding.cu; do
      if "$NVCC" "${BFLAGS[@]}" "${INC[@]}" -c -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
          "$f" -o "$TMP/$(basename "$f").o" >"$TMP/binding.log" 2>&1; then
        echo "cuda_check: compiled $f against torch headers (sm_80, sm_90; not linked)"
      else
        echo "cuda_check: FAILED to compile $f:"
        grep -v "Wc++20-extensions\|bit-field" "$TMP/binding.log" | head -60
        status=1
      fi
    done
  fi
else
  echo "cuda_check: bindings (csrc/cuda/*_binding.cu) not compiled here (scripts/cuda_check.sh --bindings does)"
fi

if [ $status -eq 0 ]; then
  echo "cuda_check: OK"
else
  echo "cuda_check: FAILED"
fi
exit $status
