// CPU kernels of srntt::_patch_match_fused and srntt::_patch_match_topk_fused (semantics:
// docs/DESIGN.md, "patch_match semantics"; top-k: docs/CONTRACT.md §2a).
//
// Two algorithms, both exact cosine-similarity search in O(N_query * K + N_key) extra memory,
// each query patch keeping its best K (+ 1) pairs (topk_cpu.h) or, at k = 1, its best pair and
// a short list of near ties:
//  * blocked (any patch size / stride / padding, float32 and float64): im2col tiles of query
//    and key patches, one register-blocked GEMM per tile pair (gemm_tile_cpu.h), the running
//    best pairs per query patch updated from each score tile.
//  * overlap (float32, stride 1, any patch size / padding): pixel-level dot products summed over
//    the patch offsets, ~p^2 times fewer flops; see patch_match_overlap_cpu.cpp. float64 stays
//    on the blocked path (the speed target is float32; float64 is the checking dtype).
//
// NB: candidates are ranked by dot * (1 / max(|k|, eps)) with the reciprocal precomputed in
// double, which is the cosine up to the query's constant factor and at most an ulp from dividing;
// the returned score divides by max(|q|, eps) in double. Norms come from box sums of per-pixel
// squared norms in double (patch_norms_cpu.h).
//
// Below float64, float32 values within kNearUlps rounding steps of |q| of each other (the
// query's near-tie band) may be ordered wrongly; such near ties go to the true maximum and only
// exact ties to the smallest index:
//  * k = 1 on the overlap path keeps the best pair and lists the keys within the band of the best
//    (usually none but the best; 0.1-0.2 % of the queries on CUFED5-size features list more).
//    A query that lists two or more takes the float64 best of those keys alone.
//  * Otherwise the search keeps K + 1 pairs, and a query whose K + 1 values come within the band
//    of each other is searched again in float64 (the blocked path on float64 copies of the maps),
//    as is a k = 1 query whose list overflowed (a flat region of many equal patches).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cpu/cpu_dispatch.h"
#include "cpu/gemm_tile_cpu.h"
#include "cpu/patch_match_overlap_cpu.h"
#include "cpu/patch_norms_cpu.h"
#include "cpu/topk_cpu.h"
#include "srntt_limits.h"

namespace srntt {
namespace {

// Rows [start, start + count) of the (grid_h * grid_w) x (C * p * p) patch matrix of one map.
template <typename scalar_t>
void im2col_rows(const scalar_t* x, int64_t C, int64_t H, int64_t W, int64_t p, int64_t stride,
                 int64_t padding, int64_t grid_w, int64_t start, int64_t count, scalar_t* out) {
  const int64_t D = C * p * p;
  for (int64_t n = 0; n < count; ++n) {
    const int64_t cell = start + n;
    const int64_t y0 = (cell / grid_w) * stride - padding;
    const int64_t x0 = (cell % grid_w) * stride - padding;
    scalar_t* row = out + n * D;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* plane = x + c * H * W;
      for (int64_t dy = 0; dy < p; ++dy) {
        const int64_t y = y0 + dy;
        scalar_t* dst = row + (c * p + dy) * p;
        if (y < 0 || y >= H) {
          std::fill(dst, dst + p, scalar_t(0));
          continue;
        }
        const scalar_t* src = plane + y * W;
        for (int64_t dx = 0; dx < p; ++dx) {
          const int64_t xx = x0 + dx;
          dst[dx] = (xx >= 0 && xx < W) ? src[xx] : scalar_t(0);
        }
      }
    }
  }
}

// The same rows packed as GEMM panels (gemm_tile_cpu.h), zero beyond `count`.
template <typename scalar_t>
void im2col_panels(const scalar_t* x, int64_t C, int64_t H, int64_t W, int64_t p, int64_t stride,
                   int64_t padding, int64_t grid_w, int64_t start, int64_t count,
                   scalar_t* rows_scratch, scalar_t* out) {
  constexpr int64_t NR = kPanel<scalar_t>;
  const int64_t D = C * p * p;
  const int64_t n_panels = (count + NR - 1) / NR;
  im2col_rows(x, C, H, W, p, stride, padding, grid_w, start, count, rows_scratch);
  for (int64_t j = 0; j < n_panels; ++j) {
    scalar_t* panel = out + j * D * NR;
    for (int64_t l = 0; l < NR; ++l) {
      const int64_t n = j * NR + l;
      if (n >= count) {
        for (int64_t d = 0; d < D; ++d) panel[d * NR + l] = scalar_t(0);
        continue;
      }
      const scalar_t* row = rows_scratch + n * D;
      for (int64_t d = 0; d < D; ++d) panel[d * NR + l] = row[d];
    }
  }
}

// Row-major rows (n x D) into GEMM row blocks [ceil(n / kRows)][D][kRows], zero-filled.
template <typename scalar_t>
void pack_row_blocks(const scalar_t* rows, int64_t n, int64_t D, scalar_t* out) {
  for (int64_t i0 = 0; i0 < n; i0 += kRows) {
    scalar_t* block = out + i0 * D;
    for (int64_t r = 0; r < kRows; ++r) {
      if (i0 + r >= n) {
        for (int64_t d = 0; d < D; ++d) block[d * kRows + r] = scalar_t(0);
        continue;
      }
      const scalar_t* row = rows + (i0 + r) * D;
      for (int64_t d = 0; d < D; ++d) block[d * kRows + r] = row[d];
    }
  }
}

struct KeyGrid {
  int64_t H, W, grid_h, grid_w, offset;
};

// [begin, end) ranges of `cells` (global query cells b * nq + i, ascending) of one batch element
// and at most `tile` cells each.
std::vector<int64_t> cell_tiles(const std::vector<int64_t>& cells, int64_t nq, int64_t tile) {
  std::vector<int64_t> starts;
  const int64_t n = int64_t(cells.size());
  for (int64_t i = 0; i < n;) {
    starts.push_back(i);
    int64_t j = i;
    while (j < n && j - i < tile && cells[j] / nq == cells[i] / nq) ++j;
    i = j;
  }
  starts.push_back(n);
  return starts;
}

// The `kk` best pairs (dot * key_inv_norm, index) of each query cell in `cells` against every key
// patch, into vals / index[position in cells * kk ...].
template <typename scalar_t>
void search_blocked(const at::Tensor& query, const std::vector<at::Tensor>& keys,
                    const std::vector<KeyGrid>& grids, int64_t p, int64_t stride, int64_t padding,
                    const std::vector<std::vector<scalar_t>>& key_inv_norms,
                    const std::vector<int64_t>& cells, int64_t nq, int64_t gqw, int64_t kk,
                    scalar_t* vals, int64_t* index) {
  const int64_t C = query.size(1), Hq = query.size(2), Wq = query.size(3);
  const int64_t D = C * p * p;
  // Tiles are fixed sizes: results never depend on the thread count (see gemm_tile_cpu.h).
  constexpr int64_t kTileQ = 96, kTileK = 256;
  const std::vector<int64_t> starts = cell_tiles(cells, nq, kTileQ);
  const scalar_t* q_ptr = query.data_ptr<scalar_t>();

  at::parallel_for(0, int64_t(starts.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    cpu_dispatch([&] {
    std::vector<scalar_t> qbuf(kTileQ * D), kbuf(kTileK * D);
    std::vector<scalar_t> kscratch(std::max(kTileQ, kTileK) * D);
    std::vector<scalar_t> sbuf(kTileQ * kTileK);
    std::vector<scalar_t> best(kTileQ * kk);
    std::vector<int64_t> best_index(kTileQ * kk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first = starts[task], mq = starts[task + 1] - first;
      const int64_t b = cells[first] / nq;
      for (int64_t i = 0; i < mq; ++i) {
        im2col_rows(q_ptr + b * C * Hq * Wq, C, Hq, Wq, p, stride, padding, gqw,
                    cells[first + i] - b * nq, 1, kscratch.data() + i * D);
      }
      pack_row_blocks(kscratch.data(), mq, D, qbuf.data());
      std::fill(best.begin(), best.end(), -std::numeric_limits<scalar_t>::infinity());
      std::fill(best_index.begin(), best_index.end(), std::numeric_limits<int64_t>::max());
      for (size_t r = 0; r < keys.size(); ++r) {
        const KeyGrid& g = grids[r];
        const int64_t nk = g.grid_h * g.grid_w;
        const scalar_t* k_ptr = keys[r].data_ptr<scalar_t>() + b * C * g.H * g.W;
        const scalar_t* inv_norm = key_inv_norms[r].data() + b * nk;
        for (int64_t k0 = 0; k0 < nk; k0 += kTileK) {
          const int64_t mk = std::min(kTileK, nk - k0);
          const int64_t n_panels = (mk + kPanel<scalar_t> - 1) / kPanel<scalar_t>;
          im2col_panels(k_ptr, C, g.H, g.W, p, stride, padding, g.grid_w, k0, mk,
                        kscratch.data(), kbuf.data());
          gemm_packed_rows(qbuf.data(), mq, kbuf.data(), n_panels, D, sbuf.data(), kTileK);
          for (int64_t i = 0; i < mq; ++i) {
            const scalar_t* row = sbuf.data() + i * kTileK;
            scalar_t* bv = best.data() + i * kk;
            int64_t* bi = best_index.data() + i * kk;
            scalar_t last = bv[kk - 1];
            int64_t last_i = bi[kk - 1];
            for (int64_t j = 0; j < mk; ++j) {
              const scalar_t v = row[j] * inv_norm[k0 + j];
              const int64_t id = g.offset + k0 + j;
              if (!ranks_above(v, id, last, last_i)) continue;
              insert_ranked(bv, bi, 1, kk, v, id);
              last = bv[kk - 1];
              last_i = bi[kk - 1];
            }
          }
        }
      }
      std::copy(best.begin(), best.begin() + mq * kk, vals + first * kk);
      std::copy(best_index.begin(), best_index.begin() + mq * kk, index + first * kk);
    }
    });
  });
}

// The near-tie band of a query patch of norm q_norm: float32 values within it of each other may
// be ordered wrongly (see the top of this file). 0 for a zero query patch, which scores 0 against
// every key, an exact tie already.
double near_band(double q_norm) {
  return q_norm <= kNormEps ? 0.0 : q_norm * kNearUlps * std::numeric_limits<float>::epsilon();
}

// The overlap algorithm (float32 only; the float64 overload is never called). k = 1 keeps the
// best pair and lists the keys within each query's near-tie band; larger k keeps kk pairs.
void search_overlap(const at::Tensor&, const std::vector<at::Tensor>&, const std::vector<KeyGrid>&,
                    int64_t, int64_t, const std::vector<std::vector<double>>&,
                    const std::vector<double>&, int64_t, int64_t, double*, int64_t*,
                    BandCandidates*) {}

void search_overlap(const at::Tensor& q, const std::vector<at::Tensor>& keys,
                    const std::vector<KeyGrid>& grids, int64_t p, int64_t padding,
                    const std::vector<std::vector<float>>& key_inv_norms,
                    const std::vector<double>& q_norms, int64_t k, int64_t kk, float* vals,
                    int64_t* index, BandCandidates* candidates) {
  std::vector<OverlapKey> okeys;
  for (size_t r = 0; r < keys.size(); ++r) {
    okeys.push_back({keys[r].data_ptr<float>(), grids[r].H, grids[r].W, grids[r].grid_h,
                     grids[r].grid_w, grids[r].offset, key_inv_norms[r].data()});
  }
  const float* qp = q.data_ptr<float>();
  if (k > 1) {
    patch_match_overlap(qp, q.size(0), q.size(1), q.size(2), q.size(3), okeys, p, padding, kk,
                        vals, index);
    return;
  }
  // NB: the kernel compares against best - band rounded in float, at most an ulp of |q| away
  // (2^-23 |q|, 1/64 of the band): a 1/16 wider band lists every key of the exact one.
  std::vector<float> band(q_norms.size());
  for (size_t cell = 0; cell < band.size(); ++cell) {
    band[cell] = float(near_band(q_norms[cell]) * (1.0 + 1.0 / 16));
  }
  patch_match_overlap_best(qp, q.size(0), q.size(1), q.size(2), q.size(3), okeys, p, padding,
                           band.data(), vals, index, candidates);
}

// Query cells whose K + 1 float32 values hold a near tie (see the top of this file); zero query
// patches score 0 against every key, an exact tie already.
template <typename scalar_t>
std::vector<int64_t> near_ties(const std::vector<scalar_t>& vals,
                               const std::vector<double>& q_norms, int64_t k, int64_t kk) {
  std::vector<int64_t> cells;
  if (kk == k) return cells;
  for (int64_t cell = 0; cell < int64_t(q_norms.size()); ++cell) {
    const double near = near_band(q_norms[cell]);
    if (near == 0.0) continue;
    const scalar_t* v = vals.data() + cell * kk;
    for (int64_t s = 0; s < k; ++s) {
      if (double(v[s]) - double(v[s + 1]) <= near) {
        cells.push_back(cell);
        break;
      }
    }
  }
  return cells;
}

// Searches `cells` again in float64 and overwrites their results.
void rescore_float64(const at::Tensor& q, const std::vector<at::Tensor>& keys,
                     const std::vector<KeyGrid>& grids, int64_t p, int64_t stride, int64_t padding,
                     const std::vector<std::vector<double>>& key_norms,
                     const std::vector<double>& q_norms, const std::vector<int64_t>& cells,
                     int64_t nq, int64_t gqw, int64_t k, int64_t* index_out, float* score_out) {
  const at::Tensor q64 = q.to(at::kDouble);
  std::vector<at::Tensor> keys64;
  std::vector<std::vector<double>> inv64;
  for (size_t r = 0; r < keys.size(); ++r) {
    keys64.push_back(keys[r].to(at::kDouble));
    std::vector<double> inv(key_norms[r].size());
    for (size_t i = 0; i < inv.size(); ++i) inv[i] = 1.0 / std::max(key_norms[r][i], kNormEps);
    inv64.push_back(std::move(inv));
  }
  std::vector<double> vals(cells.size() * k);
  std::vector<int64_t> index(cells.size() * k);
  search_blocked<double>(q64, keys64, grids, p, stride, padding, inv64, cells, nq, gqw, k,
                         vals.data(), index.data());
  for (size_t r = 0; r < cells.size(); ++r) {
    const int64_t cell = cells[r];
    for (int64_t s = 0; s < k; ++s) {
      index_out[cell * k + s] = index[r * k + s];
      score_out[cell * k + s] = float(vals[r * k + s] / std::max(q_norms[cell], kNormEps));
    }
  }
}

void rescore_float64(const at::Tensor&, const std::vector<at::Tensor>&, const std::vector<KeyGrid>&,
                     int64_t, int64_t, int64_t, const std::vector<std::vector<double>>&,
                     const std::vector<double>&, const std::vector<int64_t>&, int64_t, int64_t,
                     int64_t, int64_t*, double*) {}

// The float64 ranking value dot * (1 / max(|k|, eps)) of query cell `cell` with key patch `id`
// (global index), the dot product summed over (c, dy, dx) in order: equal patches give
// bit-equal values.
template <typename scalar_t>
double value_float64(const at::Tensor& q, const std::vector<at::Tensor>& keys,
                     const std::vector<KeyGrid>& grids,
                     const std::vector<std::vector<double>>& key_norms, int64_t p, int64_t stride,
                     int64_t padding, int64_t nq, int64_t gqw, int64_t cell, int64_t id) {
  size_t r = 0;
  while (r + 1 < grids.size() && id >= grids[r + 1].offset) ++r;
  const KeyGrid& g = grids[r];
  const int64_t b = cell / nq, C = q.size(1), Hq = q.size(2), Wq = q.size(3);
  const int64_t local = id - g.offset;
  const int64_t qy = (cell % nq) / gqw * stride - padding, qx = (cell % nq) % gqw * stride - padding;
  const int64_t ky = local / g.grid_w * stride - padding, kx = local % g.grid_w * stride - padding;
  const scalar_t* qb = q.data_ptr<scalar_t>() + b * C * Hq * Wq;
  const scalar_t* kb = keys[r].data_ptr<scalar_t>() + b * C * g.H * g.W;
  double dot = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t dy = 0; dy < p; ++dy) {
      const int64_t y = qy + dy, yk = ky + dy;
      if (y < 0 || y >= Hq || yk < 0 || yk >= g.H) continue;
      for (int64_t dx = 0; dx < p; ++dx) {
        const int64_t x = qx + dx, xk = kx + dx;
        if (x < 0 || x >= Wq || xk < 0 || xk >= g.W) continue;
        dot += double(qb[(c * Hq + y) * Wq + x]) * double(kb[(c * g.H + yk) * g.W + xk]);
      }
    }
  }
  return dot * (1.0 / std::max(key_norms[r][b * g.grid_h * g.grid_w + local], kNormEps));
}

// k = 1 on the overlap path: a cell whose listed keys (BandCandidates) hold another key within
// the band of the best takes the float64 best of the keys in the band.
template <typename scalar_t>
void rescore_band(const at::Tensor& q, const std::vector<at::Tensor>& keys,
                  const std::vector<KeyGrid>& grids, int64_t p, int64_t stride, int64_t padding,
                  const std::vector<std::vector<double>>& key_norms,
                  const std::vector<double>& q_norms, const BandCandidates& candidates,
                  int64_t nq, int64_t gqw, int64_t* index_out, scalar_t* score_out) {
  for (size_t i = 0; i < candidates.cells.size(); ++i) {
    const int64_t cell = candidates.cells[i], first = candidates.begin[i];
    const int64_t last = candidates.begin[i + 1];
    const double near = near_band(q_norms[cell]);
    double top = -std::numeric_limits<double>::infinity();
    for (int64_t j = first; j < last; ++j) top = std::max(top, double(candidates.vals[j]));
    const auto in_band = [&](int64_t j) { return top - double(candidates.vals[j]) <= near; };
    int64_t n_in = 0;
    for (int64_t j = first; j < last; ++j) n_in += in_band(j);
    if (n_in < 2) continue;
    double best_v = -std::numeric_limits<double>::infinity();
    int64_t best_i = std::numeric_limits<int64_t>::max();
    for (int64_t j = first; j < last; ++j) {
      if (!in_band(j)) continue;
      const int64_t id = candidates.ids[j];
      const double v = value_float64<scalar_t>(q, keys, grids, key_norms, p, stride, padding, nq,
                                               gqw, cell, id);
      if (ranks_above(v, id, best_v, best_i)) best_v = v, best_i = id;
    }
    index_out[cell] = best_i;
    score_out[cell] = scalar_t(best_v / std::max(q_norms[cell], kNormEps));
  }
}

// index, score: (B, Gq_h, Gq_w, k), best first.
std::tuple<at::Tensor, at::Tensor> patch_match_topk_cpu(const at::Tensor& query,
                                                         at::TensorList keys_in,
                                                         int64_t patch_size, int64_t stride,
                                                         int64_t padding,
                                                         c10::string_view precision, int64_t k) {
  (void)precision;  // Every precision is computed as "highest" on CPU (DESIGN.md allows it).
  constexpr const char* kOp = "_patch_match_topk_fused";
  TORCH_CHECK(query.device().is_cpu(), kOp, " (CPU): query must be a CPU tensor");
  TORCH_CHECK(query.dim() == 4, kOp, ": query must be (B, C, H, W)");
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble, kOp,
              ": query must be float32 or float64");
  TORCH_CHECK(!keys_in.empty(), kOp, ": keys must not be empty");
  check_patch(kOp, patch_size, stride, padding);
  check_bound(kOp, "k", k, 1, kTopKMax);
  const at::Tensor q = query.contiguous();
  const int64_t B = q.size(0), C = q.size(1);
  const int64_t gqh = checked_grid(kOp, "query", q.size(2), patch_size, stride, padding);
  const int64_t gqw = checked_grid(kOp, "query", q.size(3), patch_size, stride, padding);
  checked_product(kOp, "query grid (B x cells)", {B, gqh, gqw}, kCellsMax);
  checked_product(kOp, "a descriptor (C x patch_size^2)", {C, patch_size, patch_size},
                  kDescriptorMax);

  std::vector<at::Tensor> keys;
  std::vector<KeyGrid> grids;
  int64_t offset = 0;
  for (const at::Tensor& key : keys_in) {
    TORCH_CHECK(key.device().is_cpu() && key.scalar_type() == q.scalar_type() && key.dim() == 4 &&
                    key.size(0) == B && key.size(1) == C,
                kOp, ": every key must be a CPU (B, C, H, W) tensor of the query's dtype, batch "
                "and channels");
    const int64_t gh = checked_grid(kOp, "a key", key.size(2), patch_size, stride, padding);
    const int64_t gw = checked_grid(kOp, "a key", key.size(3), patch_size, stride, padding);
    keys.push_back(key.contiguous());
    grids.push_back(KeyGrid{key.size(2), key.size(3), gh, gw, offset});
    offset += checked_product(kOp, "key grid", {gh, gw}, kCellsMax);
    checked_product(kOp, "key grids (B x cells)", {B, offset}, kCellsMax);
  }
  TORCH_CHECK_VALUE(k <= offset, kOp, ": k = ", k, " is more than the ", offset, " key patches");
  const int64_t nq = gqh * gqw;
  checked_numel(kOp, "the top-k lists", {B, nq, k + 1});

  at::Tensor index = at::empty({B, gqh, gqw, k}, q.options().dtype(at::kLong));
  at::Tensor score = at::empty({B, gqh, gqw, k}, q.options());
  if (B == 0 || C == 0) {
    index.zero_();
    score.zero_();
    return {index, score};
  }

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "_patch_match_topk_fused_cpu", [&] {
    const std::vector<double> q_norms = patch_norms<scalar_t>(
        q.data_ptr<scalar_t>(), B, C, q.size(2), q.size(3), patch_size, stride, padding);
    std::vector<std::vector<double>> key_norms;
    std::vector<std::vector<scalar_t>> key_inv_norms;
    for (size_t r = 0; r < keys.size(); ++r) {
      key_norms.push_back(patch_norms<scalar_t>(keys[r].data_ptr<scalar_t>(), B, C, grids[r].H,
                                                grids[r].W, patch_size, stride, padding));
      std::vector<scalar_t> inv(key_norms[r].size());
      for (size_t i = 0; i < inv.size(); ++i) {
        inv[i] = scalar_t(1.0 / std::max(key_norms[r][i], kNormEps));
      }
      key_inv_norms.push_back(std::move(inv));
    }
    // Below float64 the search also finds the near ties: at k = 1 on the overlap path it lists
    // the keys within each query's band; otherwise it keeps one slot more than asked, whose gap
    // tells a near tie at the K-th place.
    const bool is_double = std::is_same<scalar_t, double>::value;
    const bool overlap = !is_double && stride == 1 && offset < (int64_t(1) << 31);
    const bool band = overlap && k == 1;
    const int64_t kk = is_double || band ? k : k + 1;
    std::vector<scalar_t> vals(B * nq * kk);
    std::vector<int64_t> ids(B * nq * kk);
    BandCandidates candidates;
    if (overlap) {
      search_overlap(q, keys, grids, patch_size, padding, key_inv_norms, q_norms, k, kk,
                     vals.data(), ids.data(), &candidates);
    } else {
      std::vector<int64_t> cells(B * nq);
      std::iota(cells.begin(), cells.end(), int64_t(0));
      search_blocked<scalar_t>(q, keys, grids, patch_size, stride, padding, key_inv_norms, cells,
                               nq, gqw, kk, vals.data(), ids.data());
    }
    int64_t* index_ptr = index.data_ptr<int64_t>();
    scalar_t* score_ptr = score.data_ptr<scalar_t>();
    at::parallel_for(0, B * nq, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t cell = begin; cell < end; ++cell) {
        for (int64_t s = 0; s < k; ++s) {
          index_ptr[cell * k + s] = ids[cell * kk + s];
          score_ptr[cell * k + s] =
              scalar_t(double(vals[cell * kk + s]) / std::max(q_norms[cell], kNormEps));
        }
      }
    });
    if (band) {
      rescore_band(q, keys, grids, patch_size, stride, padding, key_norms, q_norms, candidates, nq,
                   gqw, index_ptr, score_ptr);
    }
    const std::vector<int64_t> redo = band ? candidates.overflow : near_ties(vals, q_norms, k, kk);
    if (!redo.empty()) {
      rescore_float64(q, keys, grids, patch_size, stride, padding, key_norms, q_norms, redo, nq,
                      gqw, k, index_ptr, score_ptr);
    }
  });
  return {index, score};
}

std::tuple<at::Tensor, at::Tensor> patch_match_fused_cpu(const at::Tensor& query,
                                                          at::TensorList keys, int64_t patch_size,
                                                          int64_t stride, int64_t padding,
                                                          c10::string_view precision) {
  auto [index, score] =
      patch_match_topk_cpu(query, keys, patch_size, stride, padding, precision, 1);
  return {index.squeeze(-1), score.squeeze(-1)};
}

}  // namespace
}  // namespace srntt

TORCH_LIBRARY_IMPL(srntt, CPU, m) {
  m.impl("_patch_match_fused", &srntt::patch_match_fused_cpu);
  m.impl("_patch_match_topk_fused", &srntt::patch_match_topk_cpu);
}
