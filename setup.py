"""Build srntt_core._C: the C++ CPU kernels always, the CUDA kernels when possible.

Switches (environment variables):
  FORCE_CUDA=1      build the CUDA kernels even if no CUDA build of torch is detected
  SRNTT_NO_CUDA=1   never build the CUDA kernels
  DEBUG=1           -O0 -g, no -DNDEBUG
  SRNTT_NATIVE=1    compile the CPU code for this machine only (-march=native): the result may not
                    run on another CPU. By default the build runs on any x86-64 CPU and picks the
                    AVX2/FMA or AVX-512 variant of the hot loops at run time (csrc/cpu/cpu_dispatch.h).
  NVCC_FLAGS        extra flags for nvcc (space separated)
  TORCH_CUDA_ARCH_LIST  as for any torch extension (default here: "8.0;9.0+PTX": cubins for A100 and
                    H100/H200, PTX that newer GPUs compile at load time)
"""

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    debug = _flag("DEBUG")
    # NB: decide from the toolkit and torch's own CUDA version, not torch.cuda.is_available():
    # build machines often have no GPU but must still build the CUDA kernels.
    with_cuda = not _flag("SRNTT_NO_CUDA") and (
        _flag("FORCE_CUDA") or (CUDA_HOME is not None and torch.version.cuda is not None)
    )
    cxx = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    if _flag("SRNTT_NATIVE"):
        cxx += ["-march=native", "-DSRNTT_NATIVE_BUILD"]
    # NB: the AVX2 / AVX-512 variants of the hot loops get their FMAs by contraction; -Wno-psabi
    # silences notes about 32-byte vector arguments in the baseline code, which is never called
    # from the variants (they inline everything they run).
    cxx += ["-std=c++17", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi"]
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "-DNDEBUG", "--use_fast_math"]
    nvcc += ["-std=c++17", "--expt-relaxed-constexpr"]
    nvcc += os.environ.get("NVCC_FLAGS", "").split()
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    rel = lambda paths: sorted(os.path.relpath(p, HERE) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    sources += rel(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    cuda_sources = rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))) if with_cuda else []

    print("srntt_core build configuration:", file=sys.stderr)
    print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}", file=sys.stderr)
    print(f"  CUDA kernels: {'yes' if with_cuda else 'no'}"
          f" ({len(cuda_sources)} .cu files, arch {os.environ.get('TORCH_CUDA_ARCH_LIST', '-')})",
          file=sys.stderr)
    print(f"  C++ sources: {len(sources)}; cxx flags: {' '.join(cxx)}", file=sys.stderr)
    if with_cuda:
        print(f"  nvcc flags: {' '.join(nvcc)}", file=sys.stderr)

    kwargs = dict(
        name="srntt_core._C",
        sources=sources + cuda_sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
        define_macros=[("SRNTT_WITH_CUDA", "1")] if with_cuda else [],
        py_limited_api=False,
    )
    ext = CUDAExtension(**kwargs) if with_cuda else CppExtension(**kwargs)
    return [ext]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


# The Triton kernels live in kernels/ at the repository root but install as srntt_core._triton:
# a top-level `kernels` package would collide with other distributions of that name.
PACKAGES = find_packages(include=["srntt_core", "srntt_core.*"]) + ["srntt_core._triton"]

setup(
    packages=PACKAGES,
    package_dir={"srntt_core._triton": "kernels"},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
