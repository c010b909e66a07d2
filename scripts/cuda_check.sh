#!/usr/bin/env bash
# Compiles every torch-free CUDA kernel header (csrc/cuda/*.cuh) with this machine's nvcc for sm_80
# and sm_90, through csrc/cuda/check/instantiate.cu (which instantiates every kernel and launcher),
# then builds and runs csrc/cuda/check/host_check.cu: the kernels' index math on the CPU against
# brute force (needs no GPU). The *_binding.cu files include torch and are built by setup.py only.
# Exit status: 0 when everything compiled and passed, or when there is nothing to check (no nvcc,
# no .cuh); 1 otherwise.
set -u
cd "$(dirname "$0")/.."

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
FLAGS=(-std=c++17 -O3 --expt-relaxed-constexpr -Icsrc)

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

if [ $status -eq 0 ]; then
  echo "cuda_check: OK"
else
  echo "cuda_check: FAILED"
fi
exit $status
