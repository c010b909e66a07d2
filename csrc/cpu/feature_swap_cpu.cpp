// CPU kernels of srntt::_feature_swap_fused and srntt::_feature_swap_fused_backward
// (semantics: docs/DESIGN.md, "feature_swap semantics").
//
// Forward gathers per output row: the window segments that land on each (batch, output row)
// are listed once, then every (batch, channel) plane replays the lists in order. Backward scatters
// per (batch, channel) plane in a fixed cell order. Both are deterministic: each output element
// is written by one thread, always summing its contributions in the same order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/cpu_dispatch.h"
#include "cpu/empty_output.h"
#include "srntt_limits.h"

namespace srntt {
namespace {

// Where each matched key cell's values window starts: reference, top row and left column in the
// values map (window size is patch_size * scale).
struct Windows {
  std::vector<int32_t> ref;
  std::vector<int64_t> top, left;
};

struct ValueGrids {
  std::vector<int64_t> H, W, grid_w, offset;
  int64_t total = 0;
};

ValueGrids value_grids(const std::vector<int64_t>& sizes, int64_t p, int64_t stride,
                       int64_t padding, int64_t scale) {
  constexpr const char* kOp = "_feature_swap_fused";
  TORCH_CHECK_VALUE(sizes.size() % 2 == 0 && !sizes.empty(), kOp, ": bad value sizes");
  ValueGrids g;
  for (size_t r = 0; r < sizes.size(); r += 2) {
    TORCH_CHECK_VALUE(sizes[r] >= scale && sizes[r + 1] >= scale, kOp, ": a values map (",
                      sizes[r], "x", sizes[r + 1], ") is smaller than scale=", scale);
    const int64_t hk = sizes[r] / scale, wk = sizes[r + 1] / scale;
    const int64_t gh = checked_grid(kOp, "a values map", hk, p, stride, padding);
    const int64_t gw = checked_grid(kOp, "a values map", wk, p, stride, padding);
    const int64_t cells = checked_product(kOp, "a key grid", {gh, gw}, kCellsMax);
    checked_product(kOp, "key grids", {g.total + cells}, kCellsMax);
    g.H.push_back(sizes[r]);
    g.W.push_back(sizes[r + 1]);
    g.grid_w.push_back(gw);
    g.offset.push_back(g.total);
    g.total += cells;
  }
  return g;
}

Windows decode_index(const at::Tensor& index, const ValueGrids& g, int64_t stride,
                     int64_t padding, int64_t scale) {
  const int64_t n = index.numel();
  const int64_t* idx = index.data_ptr<int64_t>();
  Windows w;
  w.ref.resize(n);
  w.top.resize(n);
  w.left.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = idx[i];
    TORCH_CHECK(k >= 0 && k < g.total, "_feature_swap_fused: index value ", k,
                " out of range [0, ", g.total, ")");
    const int64_t r =
        std::upper_bound(g.offset.begin(), g.offset.end(), k) - g.offset.begin() - 1;
    const int64_t local = k - g.offset[r];
    w.ref[i] = int32_t(r);
    w.top[i] = ((local / g.grid_w[r]) * stride - padding) * scale;
    w.left[i] = ((local % g.grid_w[r]) * stride - padding) * scale;
  }
  return w;
}

// Number of output windows (of length `win`, first at -offset, every `step`, `n` of them) that
// cover each of `size` output positions.
std::vector<int64_t> coverage(int64_t size, int64_t n, int64_t step, int64_t offset,
                              int64_t win) {
  std::vector<int64_t> count(size, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t lo = std::max<int64_t>(0, i * step - offset);
    const int64_t hi = std::min<int64_t>(size, i * step - offset + win);
    for (int64_t y = lo; y < hi; ++y) ++count[y];
  }
  return count;
}

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// dst[0:n] += src[0:n]; the two never overlap (output and values are different tensors).
template <typename scalar_t>
inline void add_run(scalar_t* __restrict dst, const scalar_t* __restrict src, int64_t n) {
  for (int64_t t = 0; t < n; ++t) dst[t] += src[t];
}

// float16 / bfloat16 are swapped in float32 and rounded once at the end (sums of up to
// patch_size^2 terms would otherwise round at every step).
bool is_reduced_float(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

void check_reduce(c10::string_view reduce) {
  TORCH_CHECK(reduce == "sum" || reduce == "mean",
              "_feature_swap_fused: reduce must be 'sum' or 'mean', got '", std::string(reduce),
              "'");
}


// N values of T in one SIMD register (GCC / Clang vector extension), loaded and stored unaligned.
template <typename T, int N>
struct VecType {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};
template <typename T, int N>
using Vec = typename VecType<T, N>::type;

template <typename V, typename T>
inline V load_vec(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store_vec(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Everything a forward task needs, shared by all (batch, channel group) tasks.
//
// Output pixels are grouped in blocks of step x step (block (I, J) starts at output pixel
// (I*step - off, J*step - off)). When step divides the window (win = K*step: stride divides
// patch_size), block (I, J) is covered by the cells (I-a, J-e), a, e in [0, K), that exist, and
// each of them adds a contiguous step x step piece of its values window, at window offset
// (a*step, e*step). A block inside the output whose cells all read inside their values maps is a
// "fast" block: it is summed from per-piece source pointers with fixed-size vector row pieces.
// Every other pixel (cropped borders, reads in the zero padding, other geometries) takes the
// general per-pixel rule. Both add the contributions of a pixel in the same order (cell row i
// descending, then cell column j descending), so a pixel's value does not depend on its path.
template <typename T>
struct Forward {
  int64_t B, Cv, gqh, gqw, win, step, off, out_h, out_w, K, nbh, nbw;
  std::vector<const T*> vptr;     // per values map
  std::vector<int64_t> H, W;      // per values map
  const Windows* w;               // per cell: ref, top, left
  std::vector<int64_t> cell_off;  // per cell: top * W + left in its values plane
  std::vector<uint8_t> fast;      // per (b, I, J) block
  std::vector<T> rcp;             // rows of 1 / (count_h * count_w(x)); one row of ones for "sum"
  std::vector<int64_t> rcp_row;   // per output row y: offset of its row in rcp
  T* out;
};

// The sums (before the mean's division) of output pixel (y, x), channels [c0, c0 + CB), by the
// general rule.
template <typename T, int CB>
void slow_pixel(const Forward<T>& f, int64_t b, int64_t c0, int64_t y, int64_t x, T* acc) {
  const int64_t yy = y + f.off, xx = x + f.off;
  const int64_t i_hi = std::min<int64_t>(f.gqh - 1, yy / f.step);
  const int64_t i_lo = std::max<int64_t>(0, floor_div(yy - f.win, f.step) + 1);
  const int64_t j_hi = std::min<int64_t>(f.gqw - 1, xx / f.step);
  const int64_t j_lo = std::max<int64_t>(0, floor_div(xx - f.win, f.step) + 1);
  for (int c = 0; c < CB; ++c) acc[c] = T(0);
  for (int64_t i = i_hi; i >= i_lo; --i) {
    const int64_t dy = yy - i * f.step;
    for (int64_t j = j_hi; j >= j_lo; --j) {
      const int64_t cell = (b * f.gqh + i) * f.gqw + j;
      const int32_t r = f.w->ref[cell];
      const int64_t sy = f.w->top[cell] + dy, sx = f.w->left[cell] + xx - j * f.step;
      if (sy < 0 || sy >= f.H[r] || sx < 0 || sx >= f.W[r]) continue;
      const int64_t hw = f.H[r] * f.W[r];
      const T* p = f.vptr[r] + (b * f.Cv + c0) * hw + sy * f.W[r] + sx;
      for (int c = 0; c < CB; ++c) acc[c] += p[c * hw];
    }
  }
}

// The pieces of fast block (I, J), in summation order: values map and offset (in pixels) in its
// plane. Returns their number (at most K*K).
struct Piece {
  int32_t r;
  int64_t off;
};

template <typename T>
inline int block_pieces(const Forward<T>& f, int64_t b, int64_t I, int64_t J, Piece* out) {
  int n = 0;
  for (int64_t a = 0; a < f.K; ++a) {
    const int64_t i = I - a;
    if (i < 0 || i >= f.gqh) continue;
    for (int64_t e = 0; e < f.K; ++e) {
      const int64_t j = J - e;
      if (j < 0 || j >= f.gqw) continue;
      const int64_t cell = (b * f.gqh + i) * f.gqw + j;
      const int32_t r = f.w->ref[cell];
      out[n++] = {r, f.cell_off[cell] + a * f.step * f.W[r] + e * f.step};
    }
  }
  return n;
}

constexpr int kMaxK = 8;

// The pieces are read in the order of the index (random for a random index), which the hardware
// prefetcher cannot follow: pull the planes into L2 with one sequential pass first.
inline void prefetch_l2(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

// Source pointers of fast block (I, J)'s pieces, in summation order, into the planes base[r]
// whose pixels are `unit` values wide (1: the (B, C, H, W) planes; CB: interleaved channels), with
// each piece's row stride and plane stride in values. Returns their number (at most K*K).
template <typename T>
inline int block_sources(const Forward<T>& f, int64_t b, int64_t I, int64_t J,
                         const T* const* base, int64_t unit, const T** src, int64_t* src_w,
                         int64_t* src_hw) {
  const int64_t S = f.step;
  if (f.vptr.size() == 1 && f.K == 3 && I >= 2 && I < f.gqh && J >= 2 && J < f.gqw) {
    // Interior block, one values map: the 9 pieces straight from the cell offsets.
    const int64_t* cc = f.cell_off.data() + (b * f.gqh + I) * f.gqw + J;
    const int64_t W0 = f.W[0], hw0 = f.H[0] * f.W[0];
    for (int a = 0; a < 3; ++a) {
      for (int e = 0; e < 3; ++e) {
        src[a * 3 + e] = base[0] + (cc[-a * f.gqw - e] + a * S * W0 + e * S) * unit;
        src_w[a * 3 + e] = W0 * unit;
        src_hw[a * 3 + e] = hw0 * unit;
      }
    }
    return 9;
  }
  Piece pc[kMaxK * kMaxK];
  const int n = block_pieces(f, b, I, J, pc);
  for (int k = 0; k < n; ++k) {
    const int32_t r = pc[k].r;
    src[k] = base[r] + pc[k].off * unit;
    src_w[k] = f.W[r] * unit;
    src_hw[k] = f.H[r] * f.W[r] * unit;
  }
  return n;
}

// Channels [c0, c0 + CB) of batch b on the (B, C, H, W) planes. S_: the step at compile time
// (row pieces of S_ values are one vector), or 0: the step at run time, scalar code.
template <typename T, int S_, int CB>
void forward_task_planes(const Forward<T>& f, int64_t b, int64_t c0) {
  const int64_t S = S_ ? S_ : f.step;
  const int64_t ohw = f.out_h * f.out_w;
  T* dst = f.out + (b * f.Cv + c0) * ohw;
  const uint8_t* fast = f.fast.data() + b * f.nbh * f.nbw;
  std::vector<const T*> base(f.vptr.size());
  for (size_t r = 0; r < base.size(); ++r) {
    base[r] = f.vptr[r] + (b * f.Cv + c0) * f.H[r] * f.W[r];
    prefetch_l2(base[r], CB * f.H[r] * f.W[r] * sizeof(T));
  }
  const T* src[kMaxK * kMaxK];
  int64_t src_hw[kMaxK * kMaxK], src_w[kMaxK * kMaxK];
  T tmp[CB];
  for (int64_t I = 0; I < f.nbh; ++I) {
    const int64_t y0 = I * S - f.off;
    const int64_t u_lo = std::max<int64_t>(0, -y0), u_hi = std::min<int64_t>(S, f.out_h - y0);
    for (int64_t J = 0; J < f.nbw; ++J) {
      const int64_t x0 = J * S - f.off;
      if (!fast[I * f.nbw + J]) {
        const int64_t x_lo = std::max<int64_t>(0, x0), x_hi = std::min<int64_t>(f.out_w, x0 + S);
        for (int64_t y = y0 + u_lo; y < y0 + u_hi; ++y) {
          const T* rrow = f.rcp.data() + f.rcp_row[y];
          for (int64_t x = x_lo; x < x_hi; ++x) {
            slow_pixel<T, CB>(f, b, c0, y, x, tmp);
            for (int c = 0; c < CB; ++c) dst[c * ohw + y * f.out_w + x] = tmp[c] * rrow[x];
          }
        }
        continue;
      }
      const int n = block_sources(f, b, I, J, base.data(), 1, src, src_w, src_hw);
      if constexpr (S_ > 0) {
        // All S rows x CB channels of the block at once: S * CB independent vector sums.
        using V = Vec<T, S_>;
        V acc[S_][CB] = {};
        for (int k = 0; k < n; ++k) {
          for (int u = 0; u < S_; ++u) {
            for (int c = 0; c < CB; ++c) {
              acc[u][c] += load_vec<V>(src[k] + c * src_hw[k] + u * src_w[k]);
            }
          }
        }
        for (int u = 0; u < S_; ++u) {
          const V rcp = load_vec<V>(f.rcp.data() + f.rcp_row[y0 + u] + x0);
          T* drow = dst + (y0 + u) * f.out_w + x0;
          for (int c = 0; c < CB; ++c) store_vec(drow + c * ohw, acc[u][c] * rcp);
        }
      } else {
        for (int64_t u = 0; u < S; ++u) {
          const T* rrow = f.rcp.data() + f.rcp_row[y0 + u] + x0;
          T* drow = dst + (y0 + u) * f.out_w + x0;
          for (int c = 0; c < CB; ++c) {
            for (int64_t v = 0; v < S; ++v) {
              T acc = T(0);
              for (int k = 0; k < n; ++k) acc += src[k][c * src_hw[k] + u * src_w[k] + v];
              drow[c * ohw + v] = acc * rrow[v];
            }
          }
        }
      }
    }
  }
}

// step S = 1 or 2 (relu3_1- and relu2_1-like levels), channels [c0, c0 + 8/S) of batch b: the
// values planes are first interleaved (pixel-major, CB = 8/S channels a pixel) so that a piece's
// row (S pixels x CB channels) is one 8-wide vector; each block row is summed into S interleaved
// row buffers and then written back to the CB output planes.
// pack: CB * sum(H*W) values; rows: S * CB * nbw * S values.
template <typename T, int S>
void forward_task_packed(const Forward<T>& f, int64_t b, int64_t c0, T* pack, T* rows) {
  constexpr int CB = 8 / S;
  using V = Vec<T, 8>;
  const int64_t ohw = f.out_h * f.out_w, row_len = f.nbw * S * CB;
  T* dst = f.out + (b * f.Cv + c0) * ohw;
  const uint8_t* fast = f.fast.data() + b * f.nbh * f.nbw;
  std::vector<const T*> packed(f.vptr.size());
  T* p = pack;
  for (size_t r = 0; r < f.vptr.size(); ++r) {
    const int64_t hw = f.H[r] * f.W[r];
    const T* plane = f.vptr[r] + (b * f.Cv + c0) * hw;
    for (int64_t q = 0; q < hw; ++q) {
      for (int c = 0; c < CB; ++c) p[q * CB + c] = plane[c * hw + q];
    }
    packed[r] = p;
    p += hw * CB;
  }
  const T* src[kMaxK * kMaxK];
  int64_t src_w[kMaxK * kMaxK], src_hw[kMaxK * kMaxK];
  T tmp[CB];
  for (int64_t I = 0; I < f.nbh; ++I) {
    const int64_t y0 = I * S - f.off;
    const int64_t u_lo = std::max<int64_t>(0, -y0), u_hi = std::min<int64_t>(S, f.out_h - y0);
    // rows[u][(x + off) * CB + c]: block J's pixels start at J * S * CB.
    for (int64_t J = 0; J < f.nbw; ++J) {
      const int64_t x0 = J * S - f.off;
      T* out_block = rows + J * S * CB;
      if (!fast[I * f.nbw + J]) {
        for (int64_t u = u_lo; u < u_hi; ++u) {
          for (int64_t v = 0; v < S; ++v) {
            if (x0 + v < 0 || x0 + v >= f.out_w) continue;
            slow_pixel<T, CB>(f, b, c0, y0 + u, x0 + v, tmp);
            for (int c = 0; c < CB; ++c) out_block[u * row_len + v * CB + c] = tmp[c];
          }
        }
        continue;
      }
      const int n = block_sources(f, b, I, J, packed.data(), CB, src, src_w, src_hw);
      V acc[S] = {};
      for (int k = 0; k < n; ++k) {
        for (int u = 0; u < S; ++u) acc[u] += load_vec<V>(src[k] + u * src_w[k]);
      }
      for (int u = 0; u < S; ++u) store_vec(out_block + u * row_len, acc[u]);
    }
    for (int64_t u = u_lo; u < u_hi; ++u) {
      const int64_t y = y0 + u;
      const T* rrow = f.rcp.data() + f.rcp_row[y];
      const T* row = rows + u * row_len + f.off * CB;  // output pixel x at (x + off) * CB
      for (int c = 0; c < CB; ++c) {
        T* drow = dst + c * ohw + y * f.out_w;
        for (int64_t x = 0; x < f.out_w; ++x) drow[x] = row[x * CB + c] * rrow[x];
      }
    }
  }
}

template <typename T, int S_>
void forward_group(const Forward<T>& f, int64_t b, int64_t c0, int64_t cb) {
  switch (cb) {
    case 8: return forward_task_planes<T, S_, 8>(f, b, c0);
    case 4: return forward_task_planes<T, S_, 4>(f, b, c0);
    case 2: return forward_task_planes<T, S_, 2>(f, b, c0);
    default:
      for (int64_t c = 0; c < cb; ++c) forward_task_planes<T, S_, 1>(f, b, c0 + c);
  }
}

// Runs fn(task) for every task in [0, n) on torch's threads, each thread taking the next task when
// it is done with one (the machine is often shared: an even static split waits for the slowest
// thread). Every task writes its own outputs, so the result does not depend on the schedule.
template <typename Fn>
void for_each_task(int64_t n, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    cpu_dispatch([&] {
      for (int64_t wk = begin; wk < end; ++wk) {
        for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(t);
      }
    });
  });
}

template <typename T>
void run_forward(Forward<T>& f, const ValueGrids& g, const Windows& w, bool mean) {
  const int64_t n_cells = f.B * f.gqh * f.gqw;
  f.w = &w;
  f.cell_off.resize(n_cells);
  std::vector<uint8_t> inside(n_cells);
  for (int64_t c = 0; c < n_cells; ++c) {
    const int32_t r = w.ref[c];
    f.cell_off[c] = w.top[c] * g.W[r] + w.left[c];
    inside[c] = w.top[c] >= 0 && w.top[c] + f.win <= g.H[r] && w.left[c] >= 0 &&
                w.left[c] + f.win <= g.W[r];
  }
  // Fast blocks: the window is K whole blocks, the block lies inside the output and every cell
  // covering it reads inside its values map.
  f.nbh = (f.out_h - 1 + f.off) / f.step + 1;
  f.nbw = (f.out_w - 1 + f.off) / f.step + 1;
  f.fast.assign(f.B * f.nbh * f.nbw, 0);
  for (int64_t b = 0; f.K > 0 && b < f.B; ++b) {
    for (int64_t I = 0; I < f.nbh; ++I) {
      const int64_t y0 = I * f.step - f.off;
      if (y0 < 0 || y0 + f.step > f.out_h) continue;
      for (int64_t J = 0; J < f.nbw; ++J) {
        const int64_t x0 = J * f.step - f.off;
        if (x0 < 0 || x0 + f.step > f.out_w) continue;
        bool ok = true;
        for (int64_t i = std::max<int64_t>(0, I - f.K + 1); i <= std::min(I, f.gqh - 1); ++i) {
          for (int64_t j = std::max<int64_t>(0, J - f.K + 1); j <= std::min(J, f.gqw - 1); ++j) {
            ok = ok && inside[(b * f.gqh + i) * f.gqw + j];
          }
        }
        f.fast[(b * f.nbh + I) * f.nbw + J] = ok;
      }
    }
  }
  // 1 / count(y, x) = 1 / (count_h(y) * count_w(x)): one row of reciprocals per count_h value.
  const std::vector<int64_t> count_h = coverage(f.out_h, f.gqh, f.step, f.off, f.win);
  const std::vector<int64_t> count_w = coverage(f.out_w, f.gqw, f.step, f.off, f.win);
  const int64_t rows = mean ? *std::max_element(count_h.begin(), count_h.end()) + 1 : 1;
  f.rcp.assign(rows * f.out_w, T(1));
  for (int64_t ch = 1; mean && ch < rows; ++ch) {
    for (int64_t x = 0; x < f.out_w; ++x) {
      if (count_w[x] > 0) f.rcp[ch * f.out_w + x] = T(1) / T(ch * count_w[x]);
    }
  }
  f.rcp_row.resize(f.out_h);
  for (int64_t y = 0; y < f.out_h; ++y) f.rcp_row[y] = mean ? count_h[y] * f.out_w : 0;

  int64_t plane_size = 0;  // values per channel, all maps
  for (size_t r = 0; r < f.H.size(); ++r) plane_size += f.H[r] * f.W[r];
  if (f.K > 0 && (f.step == 1 || f.step == 2) && f.Cv >= 8 / f.step) {
    // Groups of 8 / step channels (interleaved), the last channels one by one.
    const int64_t cb = 8 / f.step, groups = f.Cv / cb, rest = f.Cv % cb;
    for_each_task(f.B * (groups + rest), [&](int64_t task) {
      thread_local std::vector<T> pack, rows;
      const int64_t b = task / (groups + rest), t = task % (groups + rest);
      if (t < groups) {
        pack.resize(cb * plane_size);
        rows.resize(f.step * f.nbw * f.step * cb + 8);
        if (f.step == 1) {
          forward_task_packed<T, 1>(f, b, t * cb, pack.data(), rows.data());
        } else {
          forward_task_packed<T, 2>(f, b, t * cb, pack.data(), rows.data());
        }
      } else {
        forward_task_planes<T, 0, 1>(f, b, groups * cb + (t - groups));
      }
    });
    return;
  }
  // Channel groups: as many channels as keep their values planes (~384 KiB) in L2, at most 8.
  int64_t cb = 8;
  while (cb > 1 && cb * plane_size * int64_t(sizeof(T)) > (int64_t(384) << 10)) cb /= 2;
  const int64_t groups = (f.Cv + cb - 1) / cb;
  for_each_task(f.B * groups, [&](int64_t task) {
    const int64_t b = task / groups, c0 = (task % groups) * cb;
    const int64_t n = std::min(cb, f.Cv - c0);
    if (f.K > 0 && f.step == 2) {
      forward_group<T, 2>(f, b, c0, n);
    } else if (f.K > 0 && f.step == 4) {
      forward_group<T, 4>(f, b, c0, n);
    } else {
      forward_group<T, 0>(f, b, c0, n);
    }
  });
}

at::Tensor feature_swap_fused_cpu(at::TensorList values_in, const at::Tensor& index_in,
                                  int64_t patch_size, int64_t stride, int64_t padding,
                                  int64_t scale, int64_t out_h, int64_t out_w,
                                  c10::string_view reduce) {
  check_reduce(reduce);
  TORCH_CHECK(!values_in.empty(), "_feature_swap_fused: values must not be empty");
  TORCH_CHECK(index_in.dim() == 3 && index_in.scalar_type() == at::kLong,
              "_feature_swap_fused: index must be int64 (B, Gh, Gw)");
  constexpr const char* kOp = "_feature_swap_fused";
  check_patch(kOp, patch_size, stride, padding);
  check_bound(kOp, "scale", scale, 1, kScaleMax);
  check_bound(kOp, "out_h", out_h, 0, kSideMax);
  check_bound(kOp, "out_w", out_w, 0, kSideMax);
  checked_product(kOp, "index (B x cells)", {index_in.numel()}, kCellsMax);
  if (is_reduced_float(values_in[0])) {
    std::vector<at::Tensor> wide;
    for (const at::Tensor& v : values_in) wide.push_back(v.to(at::kFloat));
    return feature_swap_fused_cpu(wide, index_in, patch_size, stride, padding, scale, out_h, out_w,
                                  reduce)
        .to(values_in[0].scalar_type());
  }
  const at::Tensor index = index_in.contiguous();
  const int64_t B = index.size(0), gqh = index.size(1), gqw = index.size(2);
  std::vector<at::Tensor> values;
  std::vector<int64_t> sizes;
  for (const at::Tensor& v : values_in) {
    TORCH_CHECK(v.dim() == 4 && v.size(0) == B && v.size(1) == values_in[0].size(1) &&
                    v.scalar_type() == values_in[0].scalar_type() && v.device().is_cpu(),
                "_feature_swap_fused: values must be CPU (B, Cv, H, W) tensors of one dtype, "
                "with the index's batch");
    values.push_back(v.contiguous());
    sizes.push_back(v.size(2));
    sizes.push_back(v.size(3));
  }
  const int64_t Cv = values[0].size(1);
  if (checked_numel(kOp, "the output", {B, Cv, out_h, out_w}) == 0 || index.numel() == 0) {
    return at::zeros({B, Cv, out_h, out_w}, values[0].options());
  }
  at::Tensor out = empty_output({B, Cv, out_h, out_w}, values[0].options());

  const ValueGrids g = value_grids(sizes, patch_size, stride, padding, scale);
  const Windows w = decode_index(index, g, stride, padding, scale);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "_feature_swap_fused_cpu", [&] {
    Forward<scalar_t> f;
    f.B = B;
    f.Cv = Cv;
    f.gqh = gqh;
    f.gqw = gqw;
    f.win = patch_size * scale;
    f.step = stride * scale;
    f.off = padding * scale;
    f.out_h = out_h;
    f.out_w = out_w;
    f.K = (patch_size % stride == 0 && patch_size / stride <= kMaxK) ? patch_size / stride : 0;
    for (size_t r = 0; r < values.size(); ++r) {
      f.vptr.push_back(values[r].data_ptr<scalar_t>());
      f.H.push_back(g.H[r]);
      f.W.push_back(g.W[r]);
    }
    f.out = out.data_ptr<scalar_t>();
    run_forward(f, g, w, reduce == "mean");
  });
  return out;
}

std::vector<at::Tensor> feature_swap_fused_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& index_in, at::IntArrayRef value_sizes,
    int64_t patch_size, int64_t stride, int64_t padding, int64_t scale,
    c10::string_view reduce) {
  check_reduce(reduce);
  TORCH_CHECK(grad_out_in.dim() == 4 && grad_out_in.device().is_cpu(),
              "_feature_swap_fused_backward: grad_out must be a CPU (B, Cv, H, W) tensor");
  TORCH_CHECK(index_in.dim() == 3 && index_in.scalar_type() == at::kLong &&
                  index_in.size(0) == grad_out_in.size(0),
              "_feature_swap_fused_backward: index must be int64 (B, Gh, Gw)");
  constexpr const char* kOp = "_feature_swap_fused_backward";
  check_patch(kOp, patch_size, stride, padding);
  check_bound(kOp, "scale", scale, 1, kScaleMax);
  checked_product(kOp, "index (B x cells)", {index_in.numel()}, kCellsMax);
  for (size_t r = 0; r + 1 < value_sizes.size(); r += 2) {
    checked_numel(kOp, "a values gradient (value_sizes)",
                  {grad_out_in.size(0), grad_out_in.size(1), value_sizes[r], value_sizes[r + 1]});
  }
  if (is_reduced_float(grad_out_in)) {
    std::vector<at::Tensor> grads = feature_swap_fused_backward_cpu(
        grad_out_in.to(at::kFloat), index_in, value_sizes, patch_size, stride, padding, scale,
        reduce);
    for (at::Tensor& g : grads) g = g.to(grad_out_in.scalar_type());
    return grads;
  }
  const at::Tensor index = index_in.contiguous();
  const std::vector<int64_t> sizes(value_sizes.begin(), value_sizes.end());
  const ValueGrids g = value_grids(sizes, patch_size, stride, padding, scale);
  const int64_t B = index.size(0), gqh = index.size(1), gqw = index.size(2);
  const int64_t Cv = grad_out_in.size(1), out_h = grad_out_in.size(2), out_w = grad_out_in.size(3);
  const int64_t win = patch_size * scale, step = stride * scale, off = padding * scale;

  at::Tensor grad_out = grad_out_in.contiguous();
  if (reduce == "mean") {
    const auto ch = coverage(out_h, gqh, step, off, win);
    const auto cw = coverage(out_w, gqw, step, off, win);
    at::Tensor count = at::outer(at::tensor(ch, at::kLong), at::tensor(cw, at::kLong));
    // Uncovered pixels feed no window, so their divisor does not matter.
    grad_out = grad_out / count.clamp_min(1).to(grad_out.scalar_type());
  }
  std::vector<at::Tensor> grads;
  for (size_t r = 0; r < g.H.size(); ++r) {
    grads.push_back(at::zeros({B, Cv, g.H[r], g.W[r]}, grad_out.options()));
  }
  if (index.numel() == 0 || Cv == 0 || B == 0) return grads;
  const Windows w = decode_index(index, g, stride, padding, scale);

  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "_feature_swap_fused_backward_cpu", [&] {
    std::vector<scalar_t*> gptr;
    for (at::Tensor& t : grads) gptr.push_back(t.data_ptr<scalar_t>());
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    at::parallel_for(0, B * Cv, 1, [&](int64_t begin, int64_t end) {
      cpu_dispatch([&] {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / Cv;
        const scalar_t* src_plane = go + task * out_h * out_w;
        for (int64_t i = 0; i < gqh; ++i) {
          const int64_t top = i * step - off;
          for (int64_t j = 0; j < gqw; ++j) {
            const int64_t cell = (b * gqh + i) * gqw + j;
            const int32_t r = w.ref[cell];
            const int64_t Hv = g.H[r], Wv = g.W[r];
            const int64_t left = j * step - off, sy = w.top[cell], sx = w.left[cell];
            const int64_t ylo = std::max<int64_t>({0, -top, -sy});
            const int64_t yhi = std::min<int64_t>({win, out_h - top, Hv - sy});
            const int64_t xlo = std::max<int64_t>({0, -left, -sx});
            const int64_t xhi = std::min<int64_t>({win, out_w - left, Wv - sx});
            if (ylo >= yhi || xlo >= xhi) continue;
            scalar_t* dst_plane = gptr[r] + task * Hv * Wv;
            for (int64_t dy = ylo; dy < yhi; ++dy) {
              add_run(dst_plane + (sy + dy) * Wv + sx + xlo,
                      src_plane + (top + dy) * out_w + left + xlo, xhi - xlo);
            }
          }
        }
      }
      });
    });
  });
  return grads;
}

}  // namespace
}  // namespace srntt

TORCH_LIBRARY_IMPL(srntt, CPU, m) {
  m.impl("_feature_swap_fused", &srntt::feature_swap_fused_cpu);
  m.impl("_feature_swap_fused_backward", &srntt::feature_swap_fused_backward_cpu);
}
