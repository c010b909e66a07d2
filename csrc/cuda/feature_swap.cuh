// Feature swapping on the GPU (docs/CONTRACT.md §3; DESIGN.md "feature_swap semantics"), torch-free.
//
// Forward: one thread per output element gathers the (patch_size*scale)^2 windows covering it, in
// (i, j) order, so the result is deterministic without atomics.
// Backward: one thread per value element gathers from grad_out. The query cells whose matched
// window covers a value pixel are found through an inverse map built once per call: the pairs
// (b * N_key_total + index, query cell) are radix-sorted (CUB; stable, so each bucket lists its
// query cells in increasing order) and every bucket's start is found by binary search. The
// summation order is therefore fixed: nothing here depends on scheduling. A bucket longer than a
// chunk (ties, or zero query patches all matched to key 0: ~1e5 cells at 4K) would serialize its
// threads: the sorted positions are cut into fixed chunks of kSwapChunk, a first kernel sums each
// chunk's part of such a heavy bucket per window pixel in parallel, and the gather adds those chunk
// sums in chunk order (still deterministic). Extra memory is O(B * N_query + B * N_key_total) plus
// the chunk sums, 2 * N_query / kSwapChunk windows; nothing N x N.
//
// The per-element bodies are __host__ __device__ so csrc/cuda/check/host_check.cu can run them
// against a brute-force scatter on a machine without a GPU.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"

namespace srntt {
namespace cuda_kernels {

constexpr int kSwapRefsPerLaunch = 8;
// Sorted positions per chunk; a bucket with more cells than this is heavy.
constexpr int kSwapChunk = 256;

// Window geometry shared by forward and backward, in value/output pixels.
struct SwapGeom {
  int B, Cv, out_h, out_w;  // output (B, Cv, out_h, out_w)
  int gqh, gqw;             // query grid (index is (B, gqh, gqw))
  int p, s, pad, scale;
  bool mean;
  __host__ __device__ int extent() const { return p * scale; }
  __host__ __device__ int step() const { return s * scale; }
  __host__ __device__ int offset() const { return pad * scale; }
};

// Up to kSwapRefsPerLaunch references of one launch; keys of reference r are the global indices
// [offset[r], offset[r] + nk[r]).
template <typename T>
struct SwapRefs {
  int count;
  const T* ptr[kSwapRefsPerLaunch];
  int hv[kSwapRefsPerLaunch], wv[kSwapRefsPerLaunch], gkw[kSwapRefsPerLaunch];
  int64_t offset[kSwapRefsPerLaunch], nk[kSwapRefsPerLaunch];
};

// Number of output windows covering output pixel (y, x) (the "mean" divisor; separable).
__host__ __device__ inline int swap_count(const SwapGeom& g, int y, int x) {
  return covering_windows(y, g.offset(), g.step(), g.extent(), g.gqh).count() *
         covering_windows(x, g.offset(), g.step(), g.extent(), g.gqw).count();
}

// out[b, c, y, x] (before the mean division) plus `acc`, over the windows matched into `refs`.
template <typename T>
__host__ __device__ inline T swap_forward_element(const SwapRefs<T>& refs, const int64_t* index,
                                                  const SwapGeom& g, int b, int c, int y, int x, T acc) {
  const Range ri = covering_windows(y, g.offset(), g.step(), g.extent(), g.gqh);
  const Range rj = covering_windows(x, g.offset(), g.step(), g.extent(), g.gqw);
  // Position inside the window: y - ((i * s - pad) * scale) = (y + pad * scale) - i * step.
  const int Y = y + g.offset(), X = x + g.offset();
  for (int i = ri.lo; i <= ri.hi; ++i) {
    const int64_t* row = index + (static_cast<int64_t>(b) * g.gqh + i) * g.gqw;
    for (int j = rj.lo; j <= rj.hi; ++j) {
      const int64_t k = row[j];
      for (int r = 0; r < refs.count; ++r) {
        const int64_t local = k - refs.offset[r];
        if (local < 0 || local >= refs.nk[r]) continue;
        const int u = static_cast<int>(local / refs.gkw[r]), v = static_cast<int>(local % refs.gkw[r]);
        const int vy = u * g.step() - g.offset() + (Y - i * g.step());
        const int vx = v * g.step() - g.offset() + (X - j * g.step());
        if (vy >= 0 && vy < refs.hv[r] && vx >= 0 && vx < refs.wv[r])
          acc += refs.ptr[r][((static_cast<int64_t>(b) * g.Cv + c) * refs.hv[r] + vy) * refs.wv[r] + vx];
        break;
      }
    }
  }
  return acc;
}

template <typename T>
__global__ void feature_swap_forward_kernel(SwapRefs<T> refs, const int64_t* __restrict__ index,
                                            T* __restrict__ out, SwapGeom g, bool accumulate,
                                            bool finalize) {
  const int64_t plane = static_cast<int64_t>(g.out_h) * g.out_w;
  SRNTT_KERNEL_LOOP(t, g.B * g.Cv * plane) {
    const int x = static_cast<int>(t % g.out_w);
    const int y = static_cast<int>((t / g.out_w) % g.out_h);
    const int64_t bc = t / plane;
    const int c = static_cast<int>(bc % g.Cv), b = static_cast<int>(bc / g.Cv);
    T acc = swap_forward_element(refs, index, g, b, c, y, x, accumulate ? out[t] : T(0));
    if (finalize && g.mean) {
      const int n = swap_count(g, y, x);
      acc = n > 0 ? div_rn(acc, static_cast<T>(n)) : T(0);
    }
    out[t] = acc;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.

// One reference's value map in the backward pass.
struct SwapValueMap {
  int hv, wv, gkh, gkw;
  int64_t offset;    // first global key index of this reference
  int64_t nk_total;  // key cells of all references (bucket stride per batch element)
};

// The chunked inverse map. Chunk q holds sorted positions [q * chunk, (q + 1) * chunk). NB: a heavy
// bucket (more than `chunk` cells) never lies inside one chunk, so a chunk meets at most two heavy
// buckets: the one holding its first position (slot 0) and one that starts inside it and runs past
// its end (slot 1: the bucket of its last position). part[((q * 2 + slot) * Cv + c) * W^2 + w] sums,
// in sorted order, that bucket's cells within the chunk, at window pixel w = dy * W + dx (W = p * scale).
template <typename T>
struct SwapChunks {
  int chunk;
  int64_t num_chunks;  // ceil(num_cells / chunk)
  T* part;
};

// Output pixel at window offset (dy, dx) of query cell n's window, or false when outside the output.
__host__ __device__ inline bool swap_query_pixel(const SwapGeom& g, int n, int dy, int dx, int* y, int* x) {
  const int i = n / g.gqw, j = n - i * g.gqw;
  *y = i * g.step() - g.offset() + dy;
  *x = j * g.step() - g.offset() + dx;
  return *y >= 0 && *y < g.out_h && *x >= 0 && *x < g.out_w;
}

// grad_out at output pixel (y, x) of batch b, channel c, divided by its count for "mean".
template <typename T>
__host__ __device__ inline T swap_grad_at(const T* grad_out, const SwapGeom& g, int b, int c, int y, int x) {
  const T grad = grad_out[((static_cast<int64_t>(b) * g.Cv + c) * g.out_h + y) * g.out_w + x];
  return g.mean ? div_rn(grad, static_cast<T>(swap_count(g, y, x))) : grad;
}

// One chunk sum (see SwapChunks): 0 when the slot holds no heavy bucket.
template <typename T>
__host__ __device__ inline T swap_chunk_element(const T* grad_out, const int* sorted_cells,
                                                const unsigned long long* sorted_keys, const int* bucket_start,
                                                int64_t num_cells, int64_t nk_total, int64_t sentinel, int chunk,
                                                const SwapGeom& g, int64_t q, int slot, int c, int w) {
  const int64_t first = q * chunk, last = (q + 1) * chunk < num_cells ? (q + 1) * chunk : num_cells;
  const unsigned long long bucket = sorted_keys[slot == 0 ? first : last - 1];
  if (static_cast<int64_t>(bucket) >= sentinel) return T(0);
  const int64_t start = bucket_start[bucket], end = bucket_start[bucket + 1];
  if (end - start <= chunk || (slot == 1 && start <= first)) return T(0);
  const int b = static_cast<int>(static_cast<int64_t>(bucket) / nk_total);
  const int dy = w / g.extent(), dx = w - dy * g.extent();
  T acc = T(0);
  for (int64_t e = start > first ? start : first; e < (end < last ? end : last); ++e) {
    int y, x;
    if (swap_query_pixel(g, sorted_cells[e], dy, dx, &y, &x)) acc += swap_grad_at(grad_out, g, b, c, y, x);
  }
  return acc;
}

// grad_values[b, c, yv, xv] for one reference: sum over the key cells (u, v) of this reference whose
// value window covers (yv, xv), over the query cells n matched to (u, v) (bucket
// b * nk_total + offset + u * gkw + v of the sorted inverse map), of grad_out at the matching
// output pixel (divided by its count for "mean").
// A heavy bucket contributes its chunk sums (SwapChunks) in chunk order instead of its cells.
template <typename T>
__host__ __device__ inline T swap_backward_element(const T* grad_out, const int* sorted_cells,
                                                   const int* bucket_start, const SwapChunks<T>& chunks,
                                                   const SwapValueMap& m, const SwapGeom& g, int b, int c, int yv,
                                                   int xv) {
  const Range ru = covering_windows(yv, g.offset(), g.step(), g.extent(), m.gkh);
  const Range rv = covering_windows(xv, g.offset(), g.step(), g.extent(), m.gkw);
  const int W = g.extent();
  T acc = T(0);
  for (int u = ru.lo; u <= ru.hi; ++u) {
    for (int v = rv.lo; v <= rv.hi; ++v) {
      const int64_t bucket = static_cast<int64_t>(b) * m.nk_total + m.offset + static_cast<int64_t>(u) * m.gkw + v;
      const int e_begin = bucket_start[bucket], e_end = bucket_start[bucket + 1];
      // Value pixel (yv, xv) at offset (dy, dx) of key window (u, v).
      const int dy = yv - (u * g.step() - g.offset()), dx = xv - (v * g.step() - g.offset());
      if (e_end - e_begin > chunks.chunk) {
        const int64_t q0 = e_begin / chunks.chunk, q1 = (e_end - 1) / chunks.chunk;
        for (int64_t q = q0; q <= q1; ++q) {
          const int slot = q == q0 && e_begin != q0 * chunks.chunk ? 1 : 0;
          acc += chunks.part[((q * 2 + slot) * g.Cv + c) * W * W + dy * W + dx];
        }
        continue;
      }
      for (int e = e_begin; e < e_end; ++e) {
        int y, x;
        if (swap_query_pixel(g, sorted_cells[e], dy, dx, &y, &x)) acc += swap_grad_at(grad_out, g, b, c, y, x);
      }
    }
  }
  return acc;
}

// keys[t] = b * nk_total + index[t] (out-of-range indices go to the sentinel bucket B * nk_total,
// after every real one), cells[t] = query cell within its batch element.
__host__ __device__ inline void swap_inverse_entry(const int64_t* index, int64_t t, int64_t num_cells_per_batch,
                                                   int64_t nk_total, int64_t sentinel, unsigned long long* keys,
                                                   int* cells) {
  const int64_t b = t / num_cells_per_batch;
  const int64_t k = index[t];
  keys[t] = static_cast<unsigned long long>(k >= 0 && k < nk_total ? b * nk_total + k : sentinel);
  cells[t] = static_cast<int>(t - b * num_cells_per_batch);
}

static __global__ void swap_inverse_keys_kernel(const int64_t* __restrict__ index, int64_t num_cells_per_batch,
                                         int64_t total, int64_t nk_total, int64_t sentinel,
                                         unsigned long long* __restrict__ keys, int* __restrict__ cells) {
  SRNTT_KERNEL_LOOP(t, total) { swap_inverse_entry(index, t, num_cells_per_batch, nk_total, sentinel, keys, cells); }
}

// bucket_start[k] = first position of a key >= k in the sorted keys (a lower bound), k <= num_buckets.
__host__ __device__ inline int lower_bound_key(const unsigned long long* keys, int n, unsigned long long k) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (keys[mid] < k)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

static __global__ void swap_bucket_start_kernel(const unsigned long long* __restrict__ sorted_keys, int n,
                                         int64_t num_buckets, int* __restrict__ bucket_start) {
  SRNTT_KERNEL_LOOP(k, num_buckets + 1) {
    bucket_start[k] = lower_bound_key(sorted_keys, n, static_cast<unsigned long long>(k));
  }
}

template <typename T>
__global__ void feature_swap_chunk_kernel(const T* __restrict__ grad_out, const int* __restrict__ sorted_cells,
                                          const unsigned long long* __restrict__ sorted_keys,
                                          const int* __restrict__ bucket_start, int64_t num_cells, int64_t nk_total,
                                          int64_t sentinel, SwapChunks<T> chunks, SwapGeom g) {
  const int64_t ww = static_cast<int64_t>(g.extent()) * g.extent();
  SRNTT_KERNEL_LOOP(t, chunks.num_chunks * 2 * g.Cv * ww) {
    const int w = static_cast<int>(t % ww);
    const int c = static_cast<int>((t / ww) % g.Cv);
    const int64_t qs = t / (ww * g.Cv);
    chunks.part[t] = swap_chunk_element(grad_out, sorted_cells, sorted_keys, bucket_start, num_cells, nk_total,
                                        sentinel, chunks.chunk, g, qs / 2, static_cast<int>(qs % 2), c, w);
  }
}

template <typename T>
__global__ void feature_swap_backward_kernel(const T* __restrict__ grad_out,
                                             const int* __restrict__ sorted_cells,
                                             const int* __restrict__ bucket_start, SwapChunks<T> chunks,
                                             SwapValueMap m, SwapGeom g, T* __restrict__ grad_value) {
  const int64_t plane = static_cast<int64_t>(m.hv) * m.wv;
  SRNTT_KERNEL_LOOP(t, g.B * g.Cv * plane) {
    const int xv = static_cast<int>(t % m.wv);
    const int yv = static_cast<int>((t / m.wv) % m.hv);
    const int64_t bc = t / plane;
    const int c = static_cast<int>(bc % g.Cv), b = static_cast<int>(bc / g.Cv);
    grad_value[t] = swap_backward_element(grad_out, sorted_cells, bucket_start, chunks, m, g, b, c, yv, xv);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Key map r of a value map (hv, wv): (hv / scale, wv / scale); its grid by the usual formula.
inline bool swap_key_grid(int hv, int wv, int p, int s, int pad, int scale, int* gkh, int* gkw) {
  const int hk = hv / scale, wk = wv / scale;
  if (hk + 2 * pad < p || wk + 2 * pad < p) return false;
  *gkh = grid_size(hk, p, s, pad);
  *gkw = grid_size(wk, p, s, pad);
  return true;
}

inline bool swap_geom_ok(const SwapGeom& g) {
  return g.B >= 1 && g.Cv >= 1 && g.out_h >= 0 && g.out_w >= 0 && g.gqh >= 1 && g.gqw >= 1 && g.p >= 1 &&
         g.s >= 1 && g.pad >= 0 && g.scale >= 1 &&
         static_cast<int64_t>(g.gqh) * g.gqw < INT32_MAX;
}

// Fills `refs` with references [r0, r0 + kSwapRefsPerLaunch) (or up to num_refs); `offset` is the
// global index of reference r0's first key cell on entry and of the next reference's on return.
template <typename T>
bool make_swap_refs(const T* const* values, const int* value_hw, int num_refs, int r0, const SwapGeom& g,
                    int64_t* offset, SwapRefs<T>* refs) {
  *refs = SwapRefs<T>{};
  refs->count = num_refs - r0 < kSwapRefsPerLaunch ? num_refs - r0 : kSwapRefsPerLaunch;
  for (int k = 0; k < refs->count; ++k) {
    const int r = r0 + k;
    int gkh = 0, gkw = 0;
    if (!swap_key_grid(value_hw[2 * r], value_hw[2 * r + 1], g.p, g.s, g.pad, g.scale, &gkh, &gkw)) return false;
    refs->ptr[k] = values[r];
    refs->hv[k] = value_hw[2 * r];
    refs->wv[k] = value_hw[2 * r + 1];
    refs->gkw[k] = gkw;
    refs->offset[k] = *offset;
    refs->nk[k] = static_cast<int64_t>(gkh) * gkw;
    *offset += refs->nk[k];
  }
  return true;
}

// values: host array of num_refs device pointers, value_hw {Hv_0, Wv_0, ...}; out is
// (B, Cv, out_h, out_w). References go kSwapRefsPerLaunch per launch; later launches add to `out`
// and the last one divides by the count.
template <typename T>
cudaError_t feature_swap_forward(const T* const* values, const int* value_hw, int num_refs,
                                 const int64_t* index, T* out, const SwapGeom& g, cudaStream_t stream) {
  if (!swap_geom_ok(g) || num_refs < 1) return cudaErrorInvalidValue;
  const int64_t total = static_cast<int64_t>(g.B) * g.Cv * g.out_h * g.out_w;
  if (total == 0) return cudaSuccess;
  constexpr int threads = 256;
  int64_t offset = 0;
  for (int r0 = 0; r0 < num_refs; r0 += kSwapRefsPerLaunch) {
    SwapRefs<T> refs;
    if (!make_swap_refs(values, value_hw, num_refs, r0, g, &offset, &refs)) return cudaErrorInvalidValue;
    const bool first = r0 == 0, last = r0 + refs.count >= num_refs;
    feature_swap_forward_kernel<T><<<blocks_for(total, threads), threads, 0, stream>>>(refs, index, out, g,
                                                                                       !first, last);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

struct SwapBackwardPlan {
  bool ok = false;
  int64_t num_cells = 0;    // B * gqh * gqw
  int64_t nk_total = 0;     // key cells over all references
  int64_t num_buckets = 0;  // B * nk_total + 1 (the last one is the sentinel)
  int end_bit = 1;
  int64_t num_chunks = 0;   // chunks of kSwapChunk sorted positions
  int64_t part_elems = 0;   // chunk sums: num_chunks * 2 * Cv * (p * scale)^2
  size_t sort_bytes = 0;
  size_t workspace_bytes = 0;
};

// Sizes of the inverse map. With `sort_bytes` the CUB temporary storage is queried too (that needs
// the device that will run the sort to be current); without, the plan is pure arithmetic.
// `elem_bytes`: size of the gradient's element type (the chunk sums are stored in it).
inline SwapBackwardPlan plan_feature_swap_backward(const int* value_hw, int num_refs, const SwapGeom& g,
                                                   int elem_bytes, bool sort_bytes = true) {
  SwapBackwardPlan plan;
  if (!swap_geom_ok(g) || num_refs < 1) return plan;
  for (int r = 0; r < num_refs; ++r) {
    int gkh = 0, gkw = 0;
    if (!swap_key_grid(value_hw[2 * r], value_hw[2 * r + 1], g.p, g.s, g.pad, g.scale, &gkh, &gkw)) return plan;
    plan.nk_total += static_cast<int64_t>(gkh) * gkw;
  }
  plan.num_cells = static_cast<int64_t>(g.B) * g.gqh * g.gqw;
  plan.num_buckets = static_cast<int64_t>(g.B) * plan.nk_total + 1;
  // Positions in the sorted arrays and bucket starts are int.
  if (plan.num_cells >= INT32_MAX || plan.num_buckets >= INT32_MAX) return plan;
  while ((int64_t{1} << plan.end_bit) <= plan.num_buckets) ++plan.end_bit;
  plan.num_chunks = ceil_div(plan.num_cells, static_cast<int64_t>(kSwapChunk));
  plan.part_elems = plan.num_chunks * 2 * g.Cv * static_cast<int64_t>(g.extent()) * g.extent();
  if (sort_bytes) {
    const cudaError_t err = cub::DeviceRadixSort::SortPairs(
        nullptr, plan.sort_bytes, static_cast<const unsigned long long*>(nullptr),
        static_cast<unsigned long long*>(nullptr), static_cast<const int*>(nullptr), static_cast<int*>(nullptr),
        static_cast<int>(plan.num_cells), 0, plan.end_bit);
    if (err != cudaSuccess) return plan;
  }
  Workspace ws(nullptr);
  ws.take<unsigned long long>(plan.num_cells);
  ws.take<unsigned long long>(plan.num_cells);
  ws.take<int>(plan.num_cells);
  ws.take<int>(plan.num_cells);
  ws.take<int>(plan.num_buckets + 1);
  ws.take<char>(plan.part_elems * elem_bytes);
  ws.skip(plan.sort_bytes);
  plan.workspace_bytes = ws.bytes();
  plan.ok = true;
  return plan;
}

template <typename T>
size_t feature_swap_backward_workspace_bytes(const int* value_hw, int num_refs, const SwapGeom& g) {
  return plan_feature_swap_backward(value_hw, num_refs, g, sizeof(T)).workspace_bytes;
}

// grad_out (B, Cv, out_h, out_w) -> grad_values[r] (B, Cv, Hv_r, Wv_r) (host array of device pointers).
template <typename T>
cudaError_t feature_swap_backward(const T* grad_out, const int64_t* index, const int* value_hw, int num_refs,
                                  T* const* grad_values, const SwapGeom& g, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream) {
  const SwapBackwardPlan plan = plan_feature_swap_backward(value_hw, num_refs, g, sizeof(T));
  if (!plan.ok || workspace == nullptr || workspace_bytes < plan.workspace_bytes) return cudaErrorInvalidValue;
  constexpr int threads = 256;
  Workspace ws(workspace);
  auto* keys_in = ws.take<unsigned long long>(plan.num_cells);
  auto* keys_out = ws.take<unsigned long long>(plan.num_cells);
  int* cells_in = ws.take<int>(plan.num_cells);
  int* cells_out = ws.take<int>(plan.num_cells);
  int* bucket_start = ws.take<int>(plan.num_buckets + 1);
  const SwapChunks<T> chunks{kSwapChunk, plan.num_chunks,
                             reinterpret_cast<T*>(ws.take<char>(plan.part_elems * static_cast<int64_t>(sizeof(T))))};
  void* sort_tmp = ws.take<char>(static_cast<int64_t>(plan.sort_bytes));
  size_t sort_bytes = plan.sort_bytes;

  const int64_t cells_per_batch = static_cast<int64_t>(g.gqh) * g.gqw;
  swap_inverse_keys_kernel<<<blocks_for(plan.num_cells, threads), threads, 0, stream>>>(
      index, cells_per_batch, plan.num_cells, plan.nk_total, plan.num_buckets - 1, keys_in, cells_in);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = cub::DeviceRadixSort::SortPairs(sort_tmp, sort_bytes, keys_in, keys_out, cells_in, cells_out,
                                        static_cast<int>(plan.num_cells), 0, plan.end_bit, stream);
  if (err != cudaSuccess) return err;
  swap_bucket_start_kernel<<<blocks_for(plan.num_buckets + 1, threads), threads, 0, stream>>>(
      keys_out, static_cast<int>(plan.num_cells), plan.num_buckets, bucket_start);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  feature_swap_chunk_kernel<T><<<blocks_for(plan.part_elems, threads), threads, 0, stream>>>(
      grad_out, cells_out, keys_out, bucket_start, plan.num_cells, plan.nk_total, plan.num_buckets - 1, chunks, g);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  int64_t offset = 0;
  for (int r = 0; r < num_refs; ++r) {
    SwapValueMap m;
    m.hv = value_hw[2 * r];
    m.wv = value_hw[2 * r + 1];
    swap_key_grid(m.hv, m.wv, g.p, g.s, g.pad, g.scale, &m.gkh, &m.gkw);
    m.offset = offset;
    m.nk_total = plan.nk_total;
    offset += static_cast<int64_t>(m.gkh) * m.gkw;
    const int64_t total = static_cast<int64_t>(g.B) * g.Cv * m.hv * m.wv;
    if (total == 0) continue;
    feature_swap_backward_kernel<T><<<blocks_for(total, threads), threads, 0, stream>>>(
        grad_out, cells_out, bucket_start, chunks, m, g, grad_values[r]);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda_kernels
}  // namespace srntt
