// Patch matching on the GPU (docs/CONTRACT.md §2, §4; DESIGN.md "patch_match semantics"), torch-free.
//
// For every query patch q, over the key patches k of every key map (indices counted over the
// concatenation of the key grids), find argmax_k <q,k> / (max(|q|,eps) max(|k|,eps)); ties go to the
// smallest index. Nothing of size N_query x N_key is ever stored: a block owns a tile of 64 query
// patches and streams over 64-key tiles, keeping a running (max, argmax) per query in registers.
// Descriptors are never materialized either: tiles are gathered straight from the feature maps
// (implicit im2col, zero padding handled by bounds checks). Extra memory is O(N_query + N_key).
//
// Two tile kernels:
//  * match_exact_kernel: CUDA cores, arithmetic in the input dtype (double; float below sm_80).
//  * match_tc_kernel: tensor cores via wmma, TF32 ("highest", "high") or BF16 ("medium"), fp32
//    accumulation; every precision of float inputs runs here on sm_80+, so that even "highest"
//    runs at tensor-core speed and still holds its contract, through the re-scoring below.
//    Its scores s~ are only candidates. NB: with unit roundoff u of the rounded inputs and D
//    descriptor entries, |s~ - s| <= delta = 2u + u^2 + D * 2^-22 for every pair (Cauchy-Schwarz
//    bounds sum |q_i k_i| by |q| |k|; the D term covers fp32 accumulation and the norms). Let M~ be
//    the query's best s~ and T >= 0. If every key with s~ >= M~ - T is re-scored in fp32 and the
//    best re-scored key k_b is returned, then any key k left out has s(k) <= s~(k) + delta <
//    M~ - T + delta <= s(k_b) + 2 delta - T. With T = max(0, 2 delta - tol / 2) the answer is within
//    tol / 2 (plus fp32 error) of the exact maximum: the docs/CONTRACT.md §4 contract. A block only knows the
//    running M~ so far, which is <= the final M~, so it re-scores a superset: still correct.
//
// Several key maps, and splitting one key map over several blocks (for parallelism when there
// are few query tiles), go through per-split partial results merged in index order into a state
// (best value, best index, best candidate score) per query that lives in the workspace.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace srntt {
namespace cuda_kernels {

enum class MatchPrecision : int { kHighest = 0, kHigh = 1, kMedium = 2 };

// Shapes shared by the tile kernels (one batch element at a time via blockIdx.z).
struct MatchGeom {
  int C, D, p, s, pad;    // channels, descriptor length p*p*C, patch size, stride, padding
  int Hq, Wq, gqw, nq;    // query map, its grid width and number of patches
  int Hk, Wk, gkw, nk;    // key map (current one), likewise
};

// ---------------------------------------------------------------------------------------------
// Small helpers.

__host__ __device__ inline float exact_sqrt(float x) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(x);  // NB: correctly rounded even under --use_fast_math
#else
  return std::sqrt(x);
#endif
}
__host__ __device__ inline double exact_sqrt(double x) { return sqrt(x); }

template <typename T>
__host__ __device__ inline T inv_clamped_norm(T norm) {
  const T eps = static_cast<T>(kNormEps);
  const T n = norm > eps ? norm : eps;
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<T, float>::value) return __fdiv_rn(1.0f, n);
#endif
  return T(1) / n;
}

// (value, index) is better than (best_value, best_index): larger value, ties to smaller index.
template <typename T>
__host__ __device__ inline bool better(T value, int64_t index, T best_value, int64_t best_index) {
  return value > best_value || (value == best_value && index < best_index);
}

// Descriptor entry d = (c * p + dy) * p + dx (torch unfold order) packed as {c, dy << 16 | dx}.
__host__ __device__ inline int2 descriptor_entry(int d, int p) {
  const int pp = p * p;
  const int c = d / pp, r = d - c * pp;
  const int dy = r / p, dx = r - dy * p;
  return make_int2(c, (dy << 16) | dx);
}

// Plain fp32/fp64 dot product of two patch descriptors, gathered from the maps; zero padding.
template <typename T>
__host__ __device__ inline T patch_dot(const T* __restrict__ a, int Ha, int Wa, int ay, int ax,
                                       const T* __restrict__ b, int Hb, int Wb, int by, int bx,
                                       int C, int p) {
  const int64_t a_plane = static_cast<int64_t>(Ha) * Wa, b_plane = static_cast<int64_t>(Hb) * Wb;
  T acc = T(0);
  for (int dy = 0; dy < p; ++dy) {
    const int ya = ay + dy, yb = by + dy;
    if (ya < 0 || ya >= Ha || yb < 0 || yb >= Hb) continue;
    for (int dx = 0; dx < p; ++dx) {
      const int xa = ax + dx, xb = bx + dx;
      if (xa < 0 || xa >= Wa || xb < 0 || xb >= Wb) continue;
      const T* pa = a + static_cast<int64_t>(ya) * Wa + xa;
      const T* pb = b + static_cast<int64_t>(yb) * Wb + xb;
      for (int c = 0; c < C; ++c) acc = fma(pa[c * a_plane], pb[c * b_plane], acc);
    }
  }
  return acc;
}

// Threshold T of the candidate test s~ >= M~ - T for the tensor-core path (see the top comment).
inline float candidate_margin(MatchPrecision precision, int D) {
  const double u = precision == MatchPrecision::kMedium ? std::ldexp(1.0, -8)  // bf16, rounded
                                                        : std::ldexp(1.0, -10);  // tf32, even if truncated
  const double tol = precision == MatchPrecision::kMedium ? 2e-3
                     : precision == MatchPrecision::kHigh ? 1e-3
                                                           : 1e-5;  // docs/CONTRACT.md §4
  const double delta = 2 * u + u * u + D * std::ldexp(1.0, -22) + 1e-6;
  const double t = 2 * delta - tol / 2;
  return static_cast<float>(t > 0 ? t : 0);
}

// ---------------------------------------------------------------------------------------------
// Small kernels: descriptor table, norms, state, merge, output.

static __global__ void descriptor_table_kernel(int2* __restrict__ table, int D, int p) {
  SRNTT_KERNEL_LOOP(d, D) { table[d] = descriptor_entry(static_cast<int>(d), p); }
}

// ss[b, y, x] = sum_c x[b, c, y, x]^2.
template <typename T>
__global__ void channel_sumsq_kernel(const T* __restrict__ x, T* __restrict__ ss, int B, int C,
                                     int64_t plane) {
  SRNTT_KERNEL_LOOP(t, B * plane) {
    const int64_t b = t / plane, pix = t - b * plane;
    const T* px = x + b * C * plane + pix;
    T acc = T(0);
    for (int c = 0; c < C; ++c) {
      const T v = px[c * plane];
      acc = fma(v, v, acc);
    }
    ss[t] = acc;
  }
}

// norm[b, n] = sqrt(sum over the (zero-padded) window of ss): the L2 norm of the descriptor.
template <typename T>
__global__ void patch_norm_kernel(const T* __restrict__ ss, T* __restrict__ norm, int B, int H, int W,
                                  int gw, int n_patches, int p, int s, int pad) {
  SRNTT_KERNEL_LOOP(t, static_cast<int64_t>(B) * n_patches) {
    const int64_t b = t / n_patches;
    const int n = static_cast<int>(t - b * n_patches);
    const int y0 = (n / gw) * s - pad, x0 = (n % gw) * s - pad;
    const T* pss = ss + b * H * W;
    T acc = T(0);
    for (int dy = 0; dy < p; ++dy) {
      const int y = y0 + dy;
      if (y < 0 || y >= H) continue;
      for (int dx = 0; dx < p; ++dx) {
        const int x = x0 + dx;
        if (x >= 0 && x < W) acc += pss[static_cast<int64_t>(y) * W + x];
      }
    }
    norm[t] = exact_sqrt(acc);
  }
}

// NB: a zero query patch scores exactly 0 against every key, so its answer is index 0 (the
// smallest) with score 0; setting that here spares the tensor-core path re-scoring every key.
template <typename T>
__global__ void init_state_kernel(const T* __restrict__ qnorm, int64_t n, T* __restrict__ best_val,
                                  int64_t* __restrict__ best_idx, float* __restrict__ best_apx) {
  SRNTT_KERNEL_LOOP(t, n) {
    best_val[t] = qnorm[t] == T(0) ? T(0) : -static_cast<T>(INFINITY);
    best_idx[t] = 0;
    best_apx[t] = -INFINITY;
  }
}

// Folds the per-split partial results (split s covers keys before split s+1) into the state.
template <typename T>
__global__ void merge_kernel(int64_t n, int splits, const T* __restrict__ part_val,
                             const int64_t* __restrict__ part_idx, const float* __restrict__ part_apx,
                             T* __restrict__ best_val, int64_t* __restrict__ best_idx,
                             float* __restrict__ best_apx) {
  SRNTT_KERNEL_LOOP(t, n) {
    T v = best_val[t];
    int64_t id = best_idx[t];
    float apx = best_apx[t];
    for (int sp = 0; sp < splits; ++sp) {
      const T pv = part_val[sp * n + t];
      const int64_t pi = part_idx[sp * n + t];
      if (better(pv, pi, v, id)) {
        v = pv;
        id = pi;
      }
      if (part_apx != nullptr) apx = fmaxf(apx, part_apx[sp * n + t]);
    }
    best_val[t] = v;
    best_idx[t] = id;
    best_apx[t] = apx;
  }
}

template <typename T>
__global__ void write_output_kernel(int64_t n, const T* __restrict__ best_val,
                                    const int64_t* __restrict__ best_idx, int64_t* __restrict__ index,
                                    T* __restrict__ score) {
  SRNTT_KERNEL_LOOP(t, n) {
    index[t] = best_idx[t];
    score[t] = best_val[t];
  }
}

// ---------------------------------------------------------------------------------------------
// Exact tile kernel (CUDA cores). 256 threads as 16 x 16; thread (ty, tx) owns query rows
// ty + 16 i and key columns tx + 16 j (i, j < 4) of a 64 x 64 tile, so shared-memory reads are
// broadcasts (rows) or conflict-free (columns) and the code is the same for float and double.

constexpr int kExactBM = 64, kExactBN = 64, kExactBK = 16, kExactThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kExactThreads)
    match_exact_kernel(const T* __restrict__ query, const T* __restrict__ key,
                       const int2* __restrict__ dtable, const T* __restrict__ qnorm,
                       const T* __restrict__ knorm, MatchGeom g, int64_t key_offset, int splits,
                       int64_t state_n, T* __restrict__ part_val, int64_t* __restrict__ part_idx) {
  constexpr int BM = kExactBM, BN = kExactBN, BK = kExactBK;
  __shared__ T As[BK][BM];
  __shared__ T Bs[BK][BN];
  __shared__ T inv_k[BN];

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int b = blockIdx.z, split = blockIdx.y;
  const int q0 = blockIdx.x * BM;
  const int64_t q_plane = static_cast<int64_t>(g.Hq) * g.Wq;
  const int64_t k_plane = static_cast<int64_t>(g.Hk) * g.Wk;
  const T* qb = query + static_cast<int64_t>(b) * g.C * q_plane;
  const T* kb = key + static_cast<int64_t>(b) * g.C * k_plane;

  // Loader role: column lm of the tile, descriptor rows lk + 4 r.
  const int lm = tid % BM, lk = tid / BM;
  const int lq = q0 + lm;
  const bool lq_ok = lq < g.nq;
  const int lqy = lq_ok ? (lq / g.gqw) * g.s - g.pad : 0;
  const int lqx = lq_ok ? (lq % g.gqw) * g.s - g.pad : 0;

  T inv_q[4], best_v[4];
  int64_t best_i[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int qn = q0 + ty + 16 * i;
    inv_q[i] = qn < g.nq ? inv_clamped_norm(qnorm[static_cast<int64_t>(b) * g.nq + qn]) : T(0);
    best_v[i] = -static_cast<T>(INFINITY);
    best_i[i] = 0;
  }

  const int k_tiles = static_cast<int>(ceil_div(g.nk, BN));
  const int kt_begin = static_cast<int>(static_cast<int64_t>(split) * k_tiles / splits);
  const int kt_end = static_cast<int>(static_cast<int64_t>(split + 1) * k_tiles / splits);

  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int n0 = kt * BN;
    const int lkn = n0 + lm;
    const bool lk_ok = lkn < g.nk;
    const int lky = lk_ok ? (lkn / g.gkw) * g.s - g.pad : 0;
    const int lkx = lk_ok ? (lkn % g.gkw) * g.s - g.pad : 0;
    if (tid < BN) {
      const int n = n0 + tid;
      inv_k[tid] = n < g.nk ? inv_clamped_norm(knorm[static_cast<int64_t>(b) * g.nk + n]) : T(0);
    }

    T acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = T(0);

    for (int d0 = 0; d0 < g.D; d0 += BK) {
#pragma unroll
      for (int r = 0; r < BK / 4; ++r) {
        const int kk = lk + 4 * r, d = d0 + kk;
        T a = T(0), bv = T(0);
        if (d < g.D) {
          const int2 e = __ldg(dtable + d);
          const int c = e.x, dy = e.y >> 16, dx = e.y & 0xffff;
          const int qy = lqy + dy, qx = lqx + dx, ky = lky + dy, kx = lkx + dx;
          if (lq_ok && qy >= 0 && qy < g.Hq && qx >= 0 && qx < g.Wq)
            a = __ldg(qb + c * q_plane + static_cast<int64_t>(qy) * g.Wq + qx);
          if (lk_ok && ky >= 0 && ky < g.Hk && kx >= 0 && kx < g.Wk)
            bv = __ldg(kb + c * k_plane + static_cast<int64_t>(ky) * g.Wk + kx);
        }
        As[kk][lm] = a;
        Bs[kk][lm] = bv;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        T ar[4], br[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) ar[i] = As[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) br[j] = Bs[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fma(ar[i], br[j], acc[i][j]);
      }
      __syncthreads();
    }

    // This thread meets its columns in increasing index order, so a strict '>' keeps the
    // smallest index among equal scores.
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = n0 + tx + 16 * j;
        if (n < g.nk) {
          const T v = acc[i][j] * inv_q[i] * inv_k[tx + 16 * j];
          if (v > best_v[i]) {
            best_v[i] = v;
            best_i[i] = key_offset + n;
          }
        }
      }
    __syncthreads();  // inv_k is rewritten by the next tile
  }

  // Reduce over the 16 threads (tx, lanes differing in bits 0-3) sharing each row.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    T v = best_v[i];
    long long id = best_i[i];
#pragma unroll
    for (int off = 8; off >= 1; off >>= 1) {
      const T ov = __shfl_xor_sync(0xffffffffu, v, off);
      const long long oi = __shfl_xor_sync(0xffffffffu, id, off);
      if (better(ov, static_cast<int64_t>(oi), v, static_cast<int64_t>(id))) {
        v = ov;
        id = oi;
      }
    }
    const int qn = q0 + ty + 16 * i;
    if (tx == 0 && qn < g.nq) {
      const int64_t o = split * state_n + static_cast<int64_t>(b) * g.nq + qn;
      part_val[o] = v;
      part_idx[o] = id;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core tile kernel (float inputs only). 128 threads = 4 warps, each a 32 x 32 quarter of
// the 64 x 64 tile as 2 x 2 wmma fragments. Tiles are stored k-major ([BK][64 + pad]) so that the
// gather writes consecutive addresses: A is then a col_major matrix_a, B a row_major matrix_b.

constexpr int kTcBM = 64, kTcBN = 64, kTcBK = 32, kTcThreads = 128;
// The host side sizes grids and key splits once for both tile kernels.
static_assert(kTcBM == kExactBM && kTcBN == kExactBN, "tile kernels must share their tile shape");

template <bool kBF16>
struct TcTraits;

template <>
struct TcTraits<false> {  // TF32, m16n16k8
  using smem_t = float;
  using frag_t = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8, kPad = 4;
  __device__ static float convert(float x) { return x; }  // rounded to tf32 in the fragment
};

template <>
struct TcTraits<true> {  // BF16, m16n16k16
  using smem_t = __nv_bfloat16;
  using frag_t = __nv_bfloat16;
  static constexpr int kK = 16, kPad = 8;
  __device__ static __nv_bfloat16 convert(float x) { return __float2bfloat16_rn(x); }
};

template <bool kBF16>
__global__ void __launch_bounds__(kTcThreads)
    match_tc_kernel(const float* __restrict__ query, const float* __restrict__ key,
                    const int2* __restrict__ dtable, const float* __restrict__ qnorm,
                    const float* __restrict__ knorm, MatchGeom g, int64_t key_offset, int splits,
                    int64_t state_n, float margin, const float* __restrict__ state_apx,
                    float* __restrict__ part_val, int64_t* __restrict__ part_idx,
                    float* __restrict__ part_apx) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using Traits = TcTraits<kBF16>;
  using smem_t = typename Traits::smem_t;
  using frag_t = typename Traits::frag_t;
  constexpr int BM = kTcBM, BN = kTcBN, BK = kTcBK, KK = Traits::kK;
  constexpr int LD = BM + Traits::kPad;  // BM == BN
  constexpr int LDC = BN + 4;
  // NB: wmma needs 32-byte aligned fragment pointers; every fragment offset below is a multiple
  // of 32 bytes given these leading dimensions (checked by static_asserts).
  static_assert((KK * LD * sizeof(smem_t)) % 32 == 0 && (16 * sizeof(smem_t)) % 32 == 0, "wmma alignment");
  static_assert((16 * LDC * sizeof(float)) % 32 == 0, "wmma alignment");
  __shared__ __align__(128) smem_t As[BK * LD];
  __shared__ __align__(128) smem_t Bs[BK * LD];
  __shared__ __align__(128) float Cs[BM * LDC];
  __shared__ float inv_k[BN];

  const int tid = threadIdx.x, warp = tid / 32;
  const int b = blockIdx.z, split = blockIdx.y;
  const int q0 = blockIdx.x * BM;
  const int64_t q_plane = static_cast<int64_t>(g.Hq) * g.Wq;
  const int64_t k_plane = static_cast<int64_t>(g.Hk) * g.Wk;
  const float* qb = query + static_cast<int64_t>(b) * g.C * q_plane;
  const float* kb = key + static_cast<int64_t>(b) * g.C * k_plane;

  // Loader role: column lm, descriptor rows lk + 2 r.
  const int lm = tid % BM, lk = tid / BM;
  const int lq = q0 + lm;
  const bool lq_ok = lq < g.nq;
  const int lqy = lq_ok ? (lq / g.gqw) * g.s - g.pad : 0;
  const int lqx = lq_ok ? (lq % g.gqw) * g.s - g.pad : 0;

  // Epilogue role: row er, columns eh * 32 .. eh * 32 + 31 (the pair tid, tid ^ 1 share a row).
  const int er = tid >> 1, eh = tid & 1;
  const int eq = q0 + er;
  const bool eq_ok = eq < g.nq;
  const int64_t state_at = static_cast<int64_t>(b) * g.nq + eq;
  const float eq_norm = eq_ok ? qnorm[state_at] : 0.0f;
  const float inv_q = inv_clamped_norm(eq_norm);
  const bool rescore_row = eq_ok && eq_norm != 0.0f;  // zero rows are settled by init_state_kernel
  const int eqy = eq_ok ? (eq / g.gqw) * g.s - g.pad : 0;
  const int eqx = eq_ok ? (eq % g.gqw) * g.s - g.pad : 0;
  float apx = eq_ok ? state_apx[state_at] : -INFINITY;
  float best_v = -INFINITY;
  int64_t best_i = 0;

  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const int k_tiles = static_cast<int>(ceil_div(g.nk, BN));
  const int kt_begin = static_cast<int>(static_cast<int64_t>(split) * k_tiles / splits);
  const int kt_end = static_cast<int>(static_cast<int64_t>(split + 1) * k_tiles / splits);

  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int n0 = kt * BN;
    const int lkn = n0 + lm;
    const bool lk_ok = lkn < g.nk;
    const int lky = lk_ok ? (lkn / g.gkw) * g.s - g.pad : 0;
    const int lkx = lk_ok ? (lkn % g.gkw) * g.s - g.pad : 0;
    if (tid < BN) {
      const int n = n0 + tid;
      inv_k[tid] = n < g.nk ? inv_clamped_norm(knorm[static_cast<int64_t>(b) * g.nk + n]) : 0.0f;
    }

    wmma::fragment<wmma::accumulator, 16, 16, KK, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    for (int d0 = 0; d0 < g.D; d0 += BK) {
#pragma unroll 4
      for (int r = 0; r < BK / 2; ++r) {
        const int kk = lk + 2 * r, d = d0 + kk;
        float a = 0.0f, bv = 0.0f;
        if (d < g.D) {
          const int2 e = __ldg(dtable + d);
          const int c = e.x, dy = e.y >> 16, dx = e.y & 0xffff;
          const int qy = lqy + dy, qx = lqx + dx, ky = lky + dy, kx = lkx + dx;
          if (lq_ok && qy >= 0 && qy < g.Hq && qx >= 0 && qx < g.Wq)
            a = __ldg(qb + c * q_plane + static_cast<int64_t>(qy) * g.Wq + qx);
          if (lk_ok && ky >= 0 && ky < g.Hk && kx >= 0 && kx < g.Wk)
            bv = __ldg(kb + c * k_plane + static_cast<int64_t>(ky) * g.Wk + kx);
        }
        As[kk * LD + lm] = Traits::convert(a);
        Bs[kk * LD + lm] = Traits::convert(bv);
      }
      __syncthreads();
#pragma unroll
      for (int k0 = 0; k0 < BK; k0 += KK) {
        wmma::fragment<wmma::matrix_a, 16, 16, KK, frag_t, wmma::col_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, KK, frag_t, wmma::row_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(fa[i], As + k0 * LD + wm + 16 * i, LD);
          wmma::load_matrix_sync(fb[i], Bs + k0 * LD + wn + 16 * i, LD);
          if constexpr (!kBF16) {
#pragma unroll
            for (int t = 0; t < fa[i].num_elements; ++t) fa[i].x[t] = wmma::__float_to_tf32(fa[i].x[t]);
#pragma unroll
            for (int t = 0; t < fb[i].num_elements; ++t) fb[i].x[t] = wmma::__float_to_tf32(fb[i].x[t]);
          }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wm + 16 * i) * LDC + wn + 16 * j, acc[i][j], LDC,
                                wmma::mem_row_major);
    __syncthreads();

    // Candidate scores of this row, their max (shared with the partner thread), then fp32
    // re-scoring of every candidate within `margin` of the running max.
    float tile_max = -INFINITY;
    for (int c = 0; c < 32; ++c) {
      const int col = eh * 32 + c;
      if (n0 + col < g.nk) tile_max = fmaxf(tile_max, Cs[er * LDC + col] * inv_q * inv_k[col]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    apx = fmaxf(apx, tile_max);
    if (rescore_row) {
      const float threshold = apx - margin;
      for (int c = 0; c < 32; ++c) {
        const int col = eh * 32 + c, n = n0 + col;
        if (n >= g.nk || Cs[er * LDC + col] * inv_q * inv_k[col] < threshold) continue;
        const int ky = (n / g.gkw) * g.s - g.pad, kx = (n % g.gkw) * g.s - g.pad;
        const float dot = patch_dot(qb, g.Hq, g.Wq, eqy, eqx, kb, g.Hk, g.Wk, ky, kx, g.C, g.p);
        const float v = dot * inv_q * inv_k[col];
        if (v > best_v) {  // increasing index order within this thread
          best_v = v;
          best_i = key_offset + n;
        }
      }
    }
    __syncthreads();  // Cs and inv_k are rewritten by the next tile
  }

  const float ov = __shfl_xor_sync(0xffffffffu, best_v, 1);
  const long long oi = __shfl_xor_sync(0xffffffffu, static_cast<long long>(best_i), 1);
  if (better(ov, static_cast<int64_t>(oi), best_v, best_i)) {
    best_v = ov;
    best_i = oi;
  }
  if (eh == 0 && eq_ok) {
    const int64_t o = split * state_n + state_at;
    part_val[o] = best_v;
    part_idx[o] = best_i;
    part_apx[o] = apx;
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // wmma TF32/BF16 needs sm_80+; patch_match() never launches this kernel below that
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side.

template <typename T>
struct PatchMatchArgs {
  const T* query = nullptr;       // (B, C, Hq, Wq), contiguous
  int B = 0, C = 0, Hq = 0, Wq = 0;
  int num_keys = 0;
  const T* const* keys = nullptr;  // host array of num_keys device pointers, (B, C, Hk_i, Wk_i)
  const int* key_hw = nullptr;     // host array {Hk_0, Wk_0, Hk_1, Wk_1, ...}
  int patch_size = 3, stride = 1, padding = 0;
  MatchPrecision precision = MatchPrecision::kHighest;
  int num_sms = 1;                 // multiprocessors of the device (sizes the key splitting)
  int compute_capability = 80;     // major * 10 + minor; below 80 every precision runs on CUDA cores
  int64_t* index = nullptr;        // out: (B, Gq_h, Gq_w)
  T* score = nullptr;              // out: (B, Gq_h, Gq_w)
};

struct PatchMatchPlan {
  bool ok = false;
  bool tensor_cores = false;
  int D = 0, gqh = 0, gqw = 0, nq = 0, q_tiles = 0, splits = 1, max_nk = 0;
  int64_t max_plane = 0;
  size_t workspace_bytes = 0;
};

// Validates sizes (the bindings check them first, with messages) and sizes the workspace.
template <typename T>
PatchMatchPlan plan_patch_match(const PatchMatchArgs<T>& a) {
  PatchMatchPlan plan;
  const int p = a.patch_size, s = a.stride, pad = a.padding;
  if (a.B < 1 || a.B > 65535 || a.C < 1 || a.num_keys < 1 || p < 1 || p >= (1 << 15) || s < 1 ||
      pad < 0)
    return plan;
  const int64_t D = static_cast<int64_t>(a.C) * p * p;
  const int64_t gqh = grid_size<int64_t>(a.Hq, p, s, pad);
  const int64_t gqw = grid_size<int64_t>(a.Wq, p, s, pad);
  if (D >= INT32_MAX || a.Hq + 2 * pad < p || a.Wq + 2 * pad < p || gqh * gqw >= INT32_MAX) return plan;
  int64_t max_nk = 0, max_plane = static_cast<int64_t>(a.Hq) * a.Wq, k_tiles = 0;
  for (int i = 0; i < a.num_keys; ++i) {
    const int64_t H = a.key_hw[2 * i], W = a.key_hw[2 * i + 1];
    if (H + 2 * pad < p || W + 2 * pad < p) return plan;
    const int64_t nk = grid_size<int64_t>(H, p, s, pad) * grid_size<int64_t>(W, p, s, pad);
    if (nk >= INT32_MAX - kExactBN) return plan;
    max_nk = nk > max_nk ? nk : max_nk;
    max_plane = H * W > max_plane ? H * W : max_plane;
    k_tiles = ceil_div(nk, kExactBN) > k_tiles ? ceil_div(nk, kExactBN) : k_tiles;
  }
  plan.tensor_cores = std::is_same<T, float>::value && a.compute_capability >= 80;
  plan.D = static_cast<int>(D);
  plan.gqh = static_cast<int>(gqh);
  plan.gqw = static_cast<int>(gqw);
  plan.nq = static_cast<int>(gqh * gqw);
  plan.q_tiles = static_cast<int>(ceil_div(plan.nq, kExactBM));
  plan.max_nk = static_cast<int>(max_nk);
  plan.max_plane = max_plane;
  // Split the keys over several blocks only when the query tiles alone leave SMs idle.
  const int64_t blocks = static_cast<int64_t>(a.B) * plan.q_tiles;
  int64_t splits = ceil_div(2 * static_cast<int64_t>(a.num_sms > 0 ? a.num_sms : 1), blocks);
  splits = splits < 1 ? 1 : (splits > 32 ? 32 : splits);
  plan.splits = static_cast<int>(splits < k_tiles ? splits : k_tiles);

  const int64_t state_n = static_cast<int64_t>(a.B) * plan.nq;
  Workspace ws(nullptr);
  ws.take<int2>(D);
  ws.take<T>(state_n);                                // query norms
  ws.take<T>(static_cast<int64_t>(a.B) * max_nk);     // key norms
  ws.take<T>(static_cast<int64_t>(a.B) * max_plane);  // channel sums of squares
  ws.take<T>(state_n);
  ws.take<int64_t>(state_n);
  ws.take<float>(state_n);
  ws.take<T>(plan.splits * state_n);
  ws.take<int64_t>(plan.splits * state_n);
  ws.take<float>(plan.splits * state_n);
  plan.workspace_bytes = ws.bytes();
  plan.ok = true;
  return plan;
}

template <typename T>
size_t patch_match_workspace_bytes(const PatchMatchArgs<T>& a) {
  return plan_patch_match(a).workspace_bytes;
}

template <typename T>
cudaError_t patch_match_norms(const T* x, int B, int C, int H, int W, int p, int s, int pad, T* ss,
                              T* norm, cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t plane = static_cast<int64_t>(H) * W;
  const int gw = grid_size(W, p, s, pad), n = grid_size(H, p, s, pad) * gw;
  channel_sumsq_kernel<T><<<blocks_for(B * plane, threads), threads, 0, stream>>>(x, ss, B, C, plane);
  patch_norm_kernel<T><<<blocks_for(static_cast<int64_t>(B) * n, threads), threads, 0, stream>>>(
      ss, norm, B, H, W, gw, n, p, s, pad);
  return cudaGetLastError();
}

// Runs the whole match on `stream`. `workspace` must hold patch_match_workspace_bytes(a) bytes.
template <typename T>
cudaError_t patch_match(const PatchMatchArgs<T>& a, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream) {
  const PatchMatchPlan plan = plan_patch_match(a);
  if (!plan.ok || workspace_bytes < plan.workspace_bytes || workspace == nullptr)
    return cudaErrorInvalidValue;
  constexpr int threads = 256;
  const int64_t state_n = static_cast<int64_t>(a.B) * plan.nq;
  Workspace ws(workspace);
  int2* dtable = ws.take<int2>(plan.D);
  T* qnorm = ws.take<T>(state_n);
  T* knorm = ws.take<T>(static_cast<int64_t>(a.B) * plan.max_nk);
  T* ss = ws.take<T>(static_cast<int64_t>(a.B) * plan.max_plane);
  T* best_val = ws.take<T>(state_n);
  int64_t* best_idx = ws.take<int64_t>(state_n);
  float* best_apx = ws.take<float>(state_n);
  T* part_val = ws.take<T>(plan.splits * state_n);
  int64_t* part_idx = ws.take<int64_t>(plan.splits * state_n);
  float* part_apx = ws.take<float>(plan.splits * state_n);

  cudaError_t err;
  descriptor_table_kernel<<<blocks_for(plan.D, threads), threads, 0, stream>>>(dtable, plan.D,
                                                                               a.patch_size);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  err = patch_match_norms(a.query, a.B, a.C, a.Hq, a.Wq, a.patch_size, a.stride, a.padding, ss,
                          qnorm, stream);
  if (err != cudaSuccess) return err;
  init_state_kernel<T><<<blocks_for(state_n, threads), threads, 0, stream>>>(qnorm, state_n, best_val,
                                                                             best_idx, best_apx);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  const float margin = candidate_margin(a.precision, plan.D);
  int64_t key_offset = 0;
  for (int i = 0; i < a.num_keys; ++i) {
    MatchGeom g;
    g.C = a.C;
    g.D = plan.D;
    g.p = a.patch_size;
    g.s = a.stride;
    g.pad = a.padding;
    g.Hq = a.Hq;
    g.Wq = a.Wq;
    g.gqw = plan.gqw;
    g.nq = plan.nq;
    g.Hk = a.key_hw[2 * i];
    g.Wk = a.key_hw[2 * i + 1];
    g.gkw = grid_size(g.Wk, g.p, g.s, g.pad);
    g.nk = grid_size(g.Hk, g.p, g.s, g.pad) * g.gkw;
    err = patch_match_norms(a.keys[i], a.B, a.C, g.Hk, g.Wk, g.p, g.s, g.pad, ss, knorm, stream);
    if (err != cudaSuccess) return err;

    const int k_tiles = static_cast<int>(ceil_div(g.nk, kExactBN));
    const int splits = plan.splits < k_tiles ? plan.splits : k_tiles;
    const dim3 grid(plan.q_tiles, splits, a.B);
    if (plan.tensor_cores) {
      if constexpr (std::is_same<T, float>::value) {
        if (a.precision == MatchPrecision::kMedium)
          match_tc_kernel<true><<<grid, kTcThreads, 0, stream>>>(
              a.query, a.keys[i], dtable, qnorm, knorm, g, key_offset, splits, state_n, margin,
              best_apx, part_val, part_idx, part_apx);
        else
          match_tc_kernel<false><<<grid, kTcThreads, 0, stream>>>(
              a.query, a.keys[i], dtable, qnorm, knorm, g, key_offset, splits, state_n, margin,
              best_apx, part_val, part_idx, part_apx);
      }
    } else {
      match_exact_kernel<T><<<grid, kExactThreads, 0, stream>>>(
          a.query, a.keys[i], dtable, qnorm, knorm, g, key_offset, splits, state_n, part_val, part_idx);
    }
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    merge_kernel<T><<<blocks_for(state_n, threads), threads, 0, stream>>>(
        state_n, splits, part_val, part_idx, plan.tensor_cores ? part_apx : nullptr, best_val, best_idx,
        best_apx);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    key_offset += g.nk;
  }
  write_output_kernel<T><<<blocks_for(state_n, threads), threads, 0, stream>>>(state_n, best_val, best_idx,
                                                                              a.index, a.score);
  return cudaGetLastError();
}

}  // namespace cuda_kernels
}  // namespace srntt
