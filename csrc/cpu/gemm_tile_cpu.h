// A small register-blocked GEMM for the CPU patch-matching kernels.
//
// C (M x N) = A (M x K) * B (K x N). A's rows are broadcast, packed in blocks of kRows rows
// (block i holds rows [i * kRows, (i + 1) * kRows) as K groups of kRows values); B is packed in
// panels of kPanel columns (panel j holds columns [j * kPanel, (j + 1) * kPanel) as K rows of
// kPanel values), so both operands are read as single contiguous streams.
//
// NB: every C[i][j] is one fused-multiply-add chain over k = 0, 1, ..., K-1 in order, whatever
// its position in the tile, the tile sizes or the number of threads (K blocks reload the
// accumulator from C and continue the same chain). Equal inputs therefore give bit-equal dot
// products, which is what makes "ties go to the smallest index" hold for duplicated patches, and
// the results do not depend on how work is split. BLAS (at::mm) does not promise this: its edge
// kernels round differently from its main kernel, so equal patches could score differently.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/cpu_dispatch.h"

#if defined(__FMA__) || defined(SRNTT_CPU_DISPATCH)
#include <immintrin.h>
#endif

namespace srntt {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t mask __attribute__((vector_size(32)));
  static constexpr int size = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t mask __attribute__((vector_size(32)));
  static constexpr int size = 4;
};
template <typename T>
using vec_t = typename Vec<T>::type;

template <typename T>
inline vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
// NB: a broadcast written as `{} + x`, not as the initializer {x, x, ...}: GCC lowers the
// initializer for the baseline target before inlining into the AVX2 / AVX-512 variants
// (cpu_dispatch.h), to eight inserts instead of one vbroadcastss. Adding +0.0 changes only a
// -0.0 into +0.0, so at most the sign of a zero result, which compares equal.
inline vec_t<float> vset1(float x) { return vec_t<float>{} + x; }
inline vec_t<double> vset1(double x) { return vec_t<double>{} + x; }
// a * b + c, fused when the target has FMA (one build always uses the same form).
inline vec_t<float> vfma(vec_t<float> a, vec_t<float> b, vec_t<float> c) {
#if defined(__FMA__)
  return (vec_t<float>)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
inline vec_t<double> vfma(vec_t<double> a, vec_t<double> b, vec_t<double> c) {
#if defined(__FMA__)
  return (vec_t<double>)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  return a * b + c;
#endif
}

// Columns per packed panel: two vectors.
template <typename T>
constexpr int64_t kPanel = 2 * Vec<T>::size;

// K block: a kDepth x kPanel slice of one panel (16 KB) stays in L1 across the row tiles.
template <typename T>
constexpr int64_t kDepth = 16384 / (kPanel<T> * sizeof(T));

// Rows of the broadcast operand per micro-tile.
constexpr int64_t kRows = 6;  // the switches below assume 6

#ifdef SRNTT_CPU_DISPATCH
// NB: GCC compiles a generic broadcast (vset1) for the baseline target first, and inlined into an
// AVX2 / AVX-512 variant it stays a scalar load and a register broadcast, a shuffle that competes
// with the FMAs for their port. The variants broadcast from memory instead (one load, no
// shuffle): the micro-tile runs ~1.8x faster on an AMD EPYC (Zen), with the same FMA chains.
inline __attribute__((target("avx2,fma"))) vec_t<float> vbroadcast(const float* p) {
  return (vec_t<float>)_mm256_broadcast_ss(p);
}
inline __attribute__((target("avx2,fma"))) vec_t<double> vbroadcast(const double* p) {
  return (vec_t<double>)_mm256_broadcast_sd(p);
}
#endif

// One MR x kPanel tile of C from one A row block (the first MR of its kRows rows); kAvx2: inlined
// into an AVX2 / AVX-512 variant only (gemm_tile).
template <typename T, int MR, bool kAvx2 = false>
inline void gemm_micro(const T* __restrict a, const T* __restrict b, int64_t K, T* __restrict c,
                       int64_t ldc, bool accumulate) {
  constexpr int V = Vec<T>::size;
  vec_t<T> acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    acc0[r] = accumulate ? vload(c + r * ldc) : vec_t<T>{};
    acc1[r] = accumulate ? vload(c + r * ldc + V) : vec_t<T>{};
  }
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    const vec_t<T> b0 = vload(b + k * 2 * V);
    const vec_t<T> b1 = vload(b + k * 2 * V + V);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      vec_t<T> ar;
      if constexpr (kAvx2) {
        ar = vbroadcast(a + k * kRows + r);
      } else {
        ar = vset1(a[k * kRows + r]);
      }
      acc0[r] = vfma(ar, b0, acc0[r]);
      acc1[r] = vfma(ar, b1, acc1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    vstore(c + r * ldc, acc0[r]);
    vstore(c + r * ldc + V, acc1[r]);
  }
}

// One micro-tile, by the variant this process runs. Inside a variant run_avx2 inlines; called
// from the baseline code it keeps the AVX instructions in a run_avx2 instantiation.
template <typename T, int MR>
inline void gemm_tile(bool avx2, const T* a, const T* b, int64_t K, T* c, int64_t ldc,
                      bool accumulate) {
#ifdef SRNTT_CPU_DISPATCH
  if (avx2) {
    run_avx2([&] { gemm_micro<T, MR, true>(a, b, K, c, ldc, accumulate); });
    return;
  }
#endif
  (void)avx2;
  gemm_micro<T, MR>(a, b, K, c, ldc, accumulate);
}

// C[:M, :n_panels * kPanel] = A[:M, :K] * B (layouts at the top of this file; A has
// ceil(M / kRows) blocks, zero rows as needed). While it runs, the `bytes` at each of
// prefetch[0] and prefetch[1] (the next call's operands) are pulled towards L2, spread over
// the tiles.
template <typename T>
void gemm_packed_rows(const T* a_blocks, int64_t M, const T* b_panels, int64_t n_panels, int64_t K,
                      T* c, int64_t ldc, const void* const* prefetch = nullptr,
                      int64_t bytes = 0) {
  constexpr int64_t NR = kPanel<T>;
  constexpr int64_t KC = kDepth<T>;
  const int64_t m_blocks = (M + kRows - 1) / kRows;
  const int64_t n_tiles = n_panels * m_blocks * ((K + KC - 1) / KC);
  const int64_t lines_per_tile = (bytes / 64 + n_tiles) / n_tiles;
  int64_t next_line = 0;
#ifdef SRNTT_CPU_DISPATCH
  const bool avx2 = cpu_capability() != CpuCapability::kDefault;
#else
  const bool avx2 = false;
#endif
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = K - k0 < KC ? K - k0 : KC;
    for (int64_t j = 0; j < n_panels; ++j) {
      const T* bp = b_panels + (j * K + k0) * NR;
      for (int64_t i = 0; i < M; i += kRows) {
        for (int64_t l = 0; prefetch && l < lines_per_tile && next_line * 64 < bytes; ++l) {
          __builtin_prefetch(static_cast<const char*>(prefetch[0]) + 64 * next_line, 0, 2);
          __builtin_prefetch(static_cast<const char*>(prefetch[1]) + 64 * next_line++, 0, 2);
        }
        const T* ai = a_blocks + (i * K + k0 * kRows);
        T* ci = c + i * ldc + j * NR;
        switch (M - i < kRows ? M - i : kRows) {
          case 6: gemm_tile<T, 6>(avx2, ai, bp, kc, ci, ldc, k0 > 0); break;
          case 5: gemm_tile<T, 5>(avx2, ai, bp, kc, ci, ldc, k0 > 0); break;
          case 4: gemm_tile<T, 4>(avx2, ai, bp, kc, ci, ldc, k0 > 0); break;
          case 3: gemm_tile<T, 3>(avx2, ai, bp, kc, ci, ldc, k0 > 0); break;
          case 2: gemm_tile<T, 2>(avx2, ai, bp, kc, ci, ldc, k0 > 0); break;
          default: gemm_tile<T, 1>(avx2, ai, bp, kc, ci, ldc, k0 > 0); break;
        }
      }
    }
  }
}

}  // namespace srntt
