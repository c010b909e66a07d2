// Patch-grid geometry, the norm epsilon and the bounds of the integer arguments of the ops, for
// every kernel: CPU, CUDA (host and device code) and the bindings. Torch-free, so that the CUDA
// kernel headers (csrc/cuda/*.cuh) and their torch-free checks (csrc/cuda/check) include it too;
// the c10-dependent checks built on it are in srntt_limits.h. The Python side of the same facts is
// srntt_core/ops/geometry.py; tests/test_bounds.py compiles this header and checks that the two
// agree.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SRNTT_HOST_DEVICE __host__ __device__
#else
#define SRNTT_HOST_DEVICE
#endif

namespace srntt {

// Cosine similarity: <q, k> / (max(|q|, kNormEps) * max(|k|, kNormEps)).
constexpr double kNormEps = 1e-12;

// Bounds of the integer arguments (the reasons are in srntt_core/ops/geometry.py).
constexpr int64_t kPatchSizeMax = 64;
constexpr int64_t kStrideMax = 64;
constexpr int64_t kPaddingMax = 64;
constexpr int64_t kScaleMax = 16;
constexpr int64_t kSideMax = int64_t(1) << 16;
constexpr int64_t kCellsMax = int64_t(1) << 25;
constexpr int64_t kDescriptorMax = int64_t(1) << 18;
constexpr int64_t kElementsMax = (int64_t(1) << 31) - 1;
constexpr int64_t kTopKMax = 64;
constexpr int64_t kConvChannelsMax = 4096;

// Patch positions along one side of a map of `size` pixels, zero-padded by `padding` on both
// sides; >= 1 iff size + 2 * padding >= patch_size. `I` is int in the CUDA kernels' index math
// (32-bit division) and int64_t on the host.
template <typename I>
SRNTT_HOST_DEVICE constexpr I grid_size(I size, I patch_size, I stride, I padding) {
  return (size + 2 * padding - patch_size) / stride + 1;
}

}  // namespace srntt
