// Torch-free helpers shared by the CUDA kernels (csrc/cuda/*.cuh): window coverage, workspace
// carving (the grid formula and the norm epsilon are in srntt_geometry.h). Everything here is
// __host__ __device__ where it can be, so the index math can be checked on a machine without a
// GPU (csrc/cuda/check/host_check.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../srntt_geometry.h"

namespace srntt {
namespace cuda_kernels {

// a / b rounded to nearest, as on the CPU. NB: under --use_fast_math a plain float '/' compiles to
// div.approx.ftz.f32 (up to 2 ulp off, denormals flushed); double division is always IEEE.
template <typename T>
__host__ __device__ inline T div_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<T, float>::value) return __fdiv_rn(a, b);
#endif
  return a / b;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Windows w in [0, num_windows) with top-left at w * step - offset and extent `extent` cover the
// pixel `pos` (pos >= 0) iff w * step <= pos + offset < w * step + extent. Returns [lo, hi]
// (empty when lo > hi). Used for output windows (offset = padding * scale, step = stride * scale,
// extent = patch_size * scale) and for value windows alike.
struct Range {
  int lo, hi;
  __host__ __device__ int count() const { return hi >= lo ? hi - lo + 1 : 0; }
};

__host__ __device__ inline Range covering_windows(int pos, int offset, int step, int extent,
                                                  int num_windows) {
  const int p = pos + offset;  // >= 0
  Range r;
  // NB: w * step > p - extent  <=>  w >= floor((p - extent) / step) + 1; for p - extent < 0 the
  // bound is <= 0, and C++ division truncates toward zero, so that case is handled apart.
  r.lo = p - extent < 0 ? 0 : (p - extent) / step + 1;
  r.hi = p / step;
  if (r.hi > num_windows - 1) r.hi = num_windows - 1;
  return r;
}

// Sub-allocates one caller-provided buffer (the bindings allocate it with torch's caching
// allocator); every block is 256-byte aligned.
class Workspace {
 public:
  explicit Workspace(void* base) : base_(static_cast<char*>(base)) {}
  template <typename T>
  T* take(int64_t count) {
    T* p = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += align(static_cast<size_t>(count) * sizeof(T));
    return p;
  }
  size_t bytes() const { return used_; }
  void skip(size_t bytes) { used_ += align(bytes); }
  static size_t align(size_t n) { return (n + 255) / 256 * 256; }

 private:
  char* base_;
  size_t used_ = 0;
};

// Grid-stride loop over [0, n) with 64-bit indices (4K maps x channels exceed 2^31 elements).
#define SRNTT_KERNEL_LOOP(i, n)                                                          \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

inline unsigned int blocks_for(int64_t n, int threads) {
  const int64_t max_blocks = int64_t{1} << 20;  // grid-stride loops cover the rest
  int64_t b = ceil_div(n, threads);
  if (b < 1) b = 1;
  return static_cast<unsigned int>(b < max_blocks ? b : max_blocks);
}

}  // namespace cuda_kernels
}  // namespace srntt
