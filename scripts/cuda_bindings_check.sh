#!/usr/bin/env bash
# Builds the whole extension srntt_core._C with FORCE_CUDA=1 against a real CUDA build of the
# installed torch version, on a machine without a GPU or a CUDA torch: compile and link check only
# (`make cuda-bindings-check`; opt-in, not part of CI, as the wheel is ~0.5 GB).
#
# The Linux torch wheel of the default package index is the CUDA build. Its headers and shared
# libraries are fetched once into $SRNTT_CACHE (default ~/.cache/srntt-core)/torch-<version>-cuda;
# setup.py then runs with those include directories instead of the installed torch's and links
# against the CUDA torch's libraries with --no-undefined (every symbol of _C resolved by torch,
# the CUDA runtime or Python). cuBLAS/cuSPARSE/cuSOLVER headers, which torch's ATen/cuda headers
# include but the bindings never call, come from the nvcc toolkit or else csrc/cuda/check/torch_stubs.
# The build goes to build/cuda-bindings (the installed _C is untouched); its log to
# build/cuda-bindings/build.log, whose warnings are summarized at the end.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

VERSION="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
CACHE="${SRNTT_CACHE:-$HOME/.cache/srntt-core}/torch-$VERSION-cuda"
OUT=build/cuda-bindings

if [ ! -f "$CACHE/torch/include/c10/cuda/CUDAMacros.h" ]; then
  echo "cuda_bindings_check: fetching the CUDA torch $VERSION wheel (Python $PYVER) into $CACHE"
  mkdir -p "$CACHE/wheel"
  # --isolated: the local pip configuration points torch at a CPU-only wheel.
  "$PY" -m pip download --isolated --no-deps --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux_2_28_x86_64 "torch==$VERSION" -d "$CACHE/wheel"
  "$PY" - "$CACHE" <<'EOF'
import glob, sys, zipfile
cache = sys.argv[1]
(wheel,) = glob.glob(f"{cache}/wheel/torch-*.whl")
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("torch/include/") or
             (n.startswith("torch/lib/") and n.endswith(".so"))]
    z.extractall(cache, names)
print(f"cuda_bindings_check: extracted {len(names)} files (headers, libraries)")
EOF
  rm -rf "$CACHE/wheel"
fi

# The toolkit root (nvcc on PATH may be a wrapper script elsewhere).
CUDA_ROOT="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_ROOT/bin/nvcc" ]; then
  echo "cuda_bindings_check: no nvcc under $CUDA_ROOT (set CUDA_HOME)"
  exit 1
fi
if [ ! -f "$CUDA_ROOT/include/cublas_v2.h" ] || [ ! -f "$CUDA_ROOT/include/cusparse.h" ]; then
  echo "cuda_bindings_check: cuBLAS/cuSPARSE headers not in $CUDA_ROOT/include: csrc/cuda/check/torch_stubs stands in"
  STUBS=-I"$PWD/csrc/cuda/check/torch_stubs"
else
  STUBS=""
fi
PYLIB="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"

rm -rf "$OUT" && mkdir -p "$OUT"
echo "cuda_bindings_check: building srntt_core._C (FORCE_CUDA=1, torch $VERSION CUDA headers; minutes)"
set +e
FORCE_CUDA=1 CUDA_HOME="$CUDA_ROOT" CFLAGS="$STUBS" NVCC_FLAGS="$STUBS" \
  LDFLAGS="-L$CACHE/torch/lib -L$CUDA_ROOT/lib64 -L$PYLIB -Wl,--no-as-needed -lpython$PYVER -Wl,--no-undefined" \
  "$PY" - "$CUDA_ROOT" "$CACHE" -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp" >"$OUT/build.log" 2>&1 <<'EOF'
# torch.utils.cpp_extension leaves CUDA_HOME unset in a CPU build of torch (point it at the
# toolkit) and takes its include directories from the installed torch (point them at the wheel's).
import runpy, sys
import torch.utils.cpp_extension as cpp_extension
cuda_root, cache = sys.argv[1:3]
cpp_extension.CUDA_HOME = cuda_root


def include_paths(device_type="cpu", *args, **kwargs):
    paths = [f"{cache}/torch/include", f"{cache}/torch/include/torch/csrc/api/include"]
    return paths + ([f"{cuda_root}/include"] if device_type == "cuda" else [])


cpp_extension.include_paths = include_paths
sys.argv = ["setup.py", *sys.argv[3:]]
runpy.run_path("setup.py", run_name="__main__")
EOF
rc=$?
set -e
SO="$(ls "$OUT"/lib/srntt_core/_C*.so 2>/dev/null || true)"
WARN="$(grep -c "warning" "$OUT/build.log" || true)"
if [ $rc -ne 0 ] || [ -z "$SO" ]; then
  grep -B2 -A6 "error" "$OUT/build.log" | head -80
  echo "cuda_bindings_check: FAILED (exit $rc; log: $OUT/build.log)"
  exit 1
fi
echo "cuda_bindings_check: linked $SO"
echo "  CUDA kernels registered: $(nm -DC "$SO" | grep -c "cuda_kernels::") symbols of srntt::cuda_kernels"
echo "  needs: $(readelf -d "$SO" | grep NEEDED | sed 's/.*\[\(.*\)\]/\1/' | tr '\n' ' ')"
echo "  warnings in the log: $WARN"
grep "warning" "$OUT/build.log" | sed 's/^/    /' | sort | uniq -c | sort -rn | head -20
echo "cuda_bindings_check: OK"
