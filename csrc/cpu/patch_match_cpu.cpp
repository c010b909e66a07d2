// CPU kernel of srntt::_patch_match_fused (semantics: docs/DESIGN.md, "patch_match semantics").
//
// Two algorithms, both exact cosine-similarity search in O(N_query + N_key) extra memory:
//  * blocked (any patch size / stride / padding, float32 and float64): im2col tiles of query
//    and key patches, one register-blocked GEMM per tile pair (gemm_tile_cpu.h), running
//    max/argmax per query patch.
//  * overlap (float32, stride 1, any patch size / padding): pixel-level dot products summed over
//    the patch offsets, ~p^2 times fewer flops; see patch_match_overlap_cpu.cpp. float64 stays
//    on the blocked path (the speed target is float32; float64 is the checking dtype).
//
// NB: candidates are ranked by dot * (1 / max(|k|, eps)) with the reciprocal precomputed in
// double, which is the cosine up to the query's constant factor and at most an ulp from dividing;
// the returned score divides by max(|q|, eps) in double. Norms come from box sums of per-pixel
// squared norms in double (patch_norms_cpu.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/cpu_dispatch.h"
#include "cpu/gemm_tile_cpu.h"
#include "cpu/patch_match_overlap_cpu.h"
#include "cpu/patch_norms_cpu.h"
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

template <typename scalar_t>
void patch_match_blocked(const at::Tensor& query, const std::vector<at::Tensor>& keys,
                         const std::vector<KeyGrid>& grids, int64_t p, int64_t stride,
                         int64_t padding, const std::vector<std::vector<scalar_t>>& key_inv_norms,
                         const std::vector<double>& query_norms, at::Tensor& index,
                         at::Tensor& score) {
  const int64_t B = query.size(0), C = query.size(1), Hq = query.size(2), Wq = query.size(3);
  const int64_t gqh = index.size(1), gqw = index.size(2), nq = gqh * gqw;
  const int64_t D = C * p * p;
  // Tiles are fixed sizes: results never depend on the thread count (see gemm_tile_cpu.h).
  constexpr int64_t kTileQ = 96, kTileK = 256;
  const int64_t n_qtiles = (nq + kTileQ - 1) / kTileQ;
  const scalar_t* q_ptr = query.data_ptr<scalar_t>();
  int64_t* index_ptr = index.data_ptr<int64_t>();
  scalar_t* score_ptr = score.data_ptr<scalar_t>();

  at::parallel_for(0, B * n_qtiles, 1, [&](int64_t begin, int64_t end) {
    cpu_dispatch([&] {
    std::vector<scalar_t> qbuf(kTileQ * D), kbuf(kTileK * D);
    std::vector<scalar_t> kscratch(std::max(kTileQ, kTileK) * D);
    std::vector<scalar_t> sbuf(kTileQ * kTileK);
    std::vector<scalar_t> best(kTileQ);
    std::vector<int64_t> best_index(kTileQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_qtiles;
      const int64_t q0 = (task % n_qtiles) * kTileQ;
      const int64_t mq = std::min(kTileQ, nq - q0);
      im2col_rows(q_ptr + b * C * Hq * Wq, C, Hq, Wq, p, stride, padding, gqw, q0, mq,
                  kscratch.data());
      pack_row_blocks(kscratch.data(), mq, D, qbuf.data());
      std::fill(best.begin(), best.end(), -std::numeric_limits<scalar_t>::infinity());
      std::fill(best_index.begin(), best_index.end(), 0);
      // Keys in increasing index order with a strict '>' keep the smallest index on ties.
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
            scalar_t bv = best[i];
            int64_t bi = best_index[i];
            for (int64_t j = 0; j < mk; ++j) {
              const scalar_t v = row[j] * inv_norm[k0 + j];
              if (v > bv) {
                bv = v;
                bi = g.offset + k0 + j;
              }
            }
            best[i] = bv;
            best_index[i] = bi;
          }
        }
      }
      for (int64_t i = 0; i < mq; ++i) {
        const int64_t cell = b * nq + q0 + i;
        index_ptr[cell] = best_index[i];
        score_ptr[cell] = scalar_t(double(best[i]) / std::max(query_norms[cell], kNormEps));
      }
    }
    });
  });
}

// The overlap algorithm (float32 only); returns whether it ran.
bool match_overlap(const at::Tensor&, const std::vector<at::Tensor>&, const std::vector<KeyGrid>&,
                   int64_t, int64_t, const std::vector<std::vector<double>>&,
                   const std::vector<double>&, at::Tensor&, at::Tensor&) {
  return false;
}

bool match_overlap(const at::Tensor& q, const std::vector<at::Tensor>& keys,
                   const std::vector<KeyGrid>& grids, int64_t p, int64_t padding,
                   const std::vector<std::vector<float>>& key_inv_norms,
                   const std::vector<double>& query_norms, at::Tensor& index, at::Tensor& score) {
  std::vector<OverlapKey> okeys;
  for (size_t r = 0; r < keys.size(); ++r) {
    okeys.push_back({keys[r].data_ptr<float>(), grids[r].H, grids[r].W, grids[r].grid_h,
                     grids[r].grid_w, grids[r].offset, key_inv_norms[r].data()});
  }
  patch_match_overlap(q.data_ptr<float>(), q.size(0), q.size(1), q.size(2), q.size(3), okeys, p,
                      padding, query_norms.data(), index.data_ptr<int64_t>(),
                      score.data_ptr<float>());
  return true;
}

std::tuple<at::Tensor, at::Tensor> patch_match_fused_cpu(const at::Tensor& query,
                                                          at::TensorList keys_in,
                                                          int64_t patch_size, int64_t stride,
                                                          int64_t padding,
                                                          c10::string_view precision) {
  (void)precision;  // Every precision is computed as "highest" on CPU (DESIGN.md allows it).
  TORCH_CHECK(query.device().is_cpu(), "_patch_match_fused (CPU): query must be a CPU tensor");
  TORCH_CHECK(query.dim() == 4, "_patch_match_fused: query must be (B, C, H, W)");
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble,
              "_patch_match_fused: query must be float32 or float64");
  TORCH_CHECK(!keys_in.empty(), "_patch_match_fused: keys must not be empty");
  constexpr const char* kOp = "_patch_match_fused";
  check_patch(kOp, patch_size, stride, padding);
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
  for (const at::Tensor& k : keys_in) {
    TORCH_CHECK(k.device().is_cpu() && k.scalar_type() == q.scalar_type() && k.dim() == 4 &&
                    k.size(0) == B && k.size(1) == C,
                "_patch_match_fused: every key must be a CPU (B, C, H, W) tensor of the "
                "query's dtype, batch and channels");
    const int64_t gh = checked_grid(kOp, "a key", k.size(2), patch_size, stride, padding);
    const int64_t gw = checked_grid(kOp, "a key", k.size(3), patch_size, stride, padding);
    keys.push_back(k.contiguous());
    grids.push_back(KeyGrid{k.size(2), k.size(3), gh, gw, offset});
    offset += checked_product(kOp, "key grid", {gh, gw}, kCellsMax);
    checked_product(kOp, "key grids (B x cells)", {B, offset}, kCellsMax);
  }

  at::Tensor index = at::empty({B, gqh, gqw}, q.options().dtype(at::kLong));
  at::Tensor score = at::empty({B, gqh, gqw}, q.options());
  if (B == 0 || C == 0 || gqh <= 0 || gqw <= 0) {
    index.zero_();
    score.zero_();
    return {index, score};
  }

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "_patch_match_fused_cpu", [&] {
    const std::vector<double> query_norms = patch_norms<scalar_t>(
        q.data_ptr<scalar_t>(), B, C, q.size(2), q.size(3), patch_size, stride, padding);
    std::vector<std::vector<scalar_t>> key_inv_norms;
    for (size_t r = 0; r < keys.size(); ++r) {
      const std::vector<double> n = patch_norms<scalar_t>(keys[r].data_ptr<scalar_t>(), B, C,
                                                          grids[r].H, grids[r].W, patch_size,
                                                          stride, padding);
      std::vector<scalar_t> inv(n.size());
      for (size_t i = 0; i < n.size(); ++i) inv[i] = scalar_t(1.0 / std::max(n[i], kNormEps));
      key_inv_norms.push_back(std::move(inv));
    }
    const bool overlap = stride == 1 && offset < (int64_t(1) << 31) &&
                         match_overlap(q, keys, grids, patch_size, padding, key_inv_norms,
                                       query_norms, index, score);
    if (!overlap) {
      patch_match_blocked<scalar_t>(q, keys, grids, patch_size, stride, padding, key_inv_norms,
                                    query_norms, index, score);
    }
  });
  return {index, score};
}

}  // namespace
}  // namespace srntt

TORCH_LIBRARY_IMPL(srntt, CPU, m) {
  m.impl("_patch_match_fused", &srntt::patch_match_fused_cpu);
}
