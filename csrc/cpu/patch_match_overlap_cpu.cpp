// Stride-1 patch matching from pixel-level dot products (float32).
//
// For stride 1 the dot product of query patch (qy, qx) with key patch (ky, kx) is a sum of
// pixel-level dot products over the p x p offsets:
//   S(qy, qx; ky, kx) = sum_{dy, dx} <Q(qy + dy, qx + dx), K(ky + dy, kx + dx)>   (K = C each),
// on the zero-padded maps. Every pixel pair is shared by up to p^2 patch pairs, so computing the
// pixel-level products once and summing them is ~p^2 times fewer flops than a GEMM on im2col
// patches (9x for 3x3).
//
// The pixel pairs a patch pair needs all lie on one "row diagonal" d = qy - ky. For each d we
// walk down the query pixel rows a = qy, qy + 1, ...: one small GEMM gives
//   P_a[kx'][qx'] = <Q(a, qx'), K(a - d, kx')>                   (all pixels of the two rows),
// the x-offsets are summed at once, X_a[kx][qx] = sum_dx P_a[kx + dx][qx + dx], and the last p
// of them, kept in a ring, give S for patch row qy = a - p + 1 against key row qy - p + 1 - d.
// Each P_a is computed exactly once per query-row chunk (plus p - 1 rows of halo per diagonal),
// stays in L1/L2, and the running max / argmax per query patch is updated straight from it.
//
// NB: S is summed as ((sum over k of pixel products) summed over dx) summed over dy, not as one
// chain over the 9C patch values. Both are fp32 sums of the same terms; the error bound is the
// same order (~sqrt(9C) * 2^-24 relative to |q||k|, well below the 1e-5 contract on cosine
// scores), but near-ties within ~1e-7 may resolve differently from the blocked path. Within this
// path every patch pair is computed with the same operation sequence, so duplicated patches tie
// exactly and ties go to the smallest index (the update is a lexicographic (score, -index) max
// because diagonals do not visit keys in index order).
#include "cpu/patch_match_overlap_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "cpu/cpu_dispatch.h"
#include "cpu/gemm_tile_cpu.h"
#include "srntt_geometry.h"

namespace srntt {
namespace {

constexpr int64_t NR = kPanel<float>;
constexpr int V = Vec<float>::size;
using vf = vec_t<float>;
using vi = Vec<float>::mask;

// Query rows as GEMM panels: [b][row][panel][c][NR] (no padding: padded pixels are zero and
// their pixel-level products are known to be zero).
std::vector<float> pack_query(const float* q, int64_t B, int64_t C, int64_t H, int64_t W,
                              int64_t n_panels) {
  const int64_t row_size = n_panels * C * NR;
  std::vector<float> out(B * H * row_size, 0.0f);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / H, y = t % H;
      float* row = out.data() + t * row_size;
      for (int64_t c = 0; c < C; ++c) {
        const float* src = q + ((b * C + c) * H + y) * W;
        for (int64_t x = 0; x < W; ++x) row[((x / NR) * C + c) * NR + x % NR] = src[x];
      }
    }
  });
  return out;
}

// Key rows in GEMM row blocks: [b][row][x / kRows][c][x % kRows], x padded with zero pixels
// to a multiple of kRows.
std::vector<float> pack_key(const float* k, int64_t B, int64_t C, int64_t H, int64_t W,
                            int64_t W_blocks) {
  const int64_t row_size = W_blocks * kRows * C;
  std::vector<float> out(B * H * row_size, 0.0f);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / H, y = t % H;
      float* row = out.data() + t * row_size;
      for (int64_t c = 0; c < C; ++c) {
        const float* src = k + ((b * C + c) * H + y) * W;
        for (int64_t x = 0; x < W; ++x) row[((x / kRows) * C + c) * kRows + x % kRows] = src[x];
      }
    }
  });
  return out;
}

}  // namespace

void patch_match_overlap(const float* query, int64_t B, int64_t C, int64_t Hq, int64_t Wq,
                         const std::vector<OverlapKey>& keys, int64_t p, int64_t padding,
                         const double* query_norms, int64_t* index, float* score) {
  const int64_t Hqp = Hq + 2 * padding, Wqp = Wq + 2 * padding;
  const int64_t gqh = Hqp - p + 1, gqw = Wqp - p + 1;
  const int64_t q_panels = (Wq + NR - 1) / NR;
  const int64_t q_row = q_panels * C * NR;
  // P[kx'][qx'] over padded coordinates: the GEMM fills the block of real pixels, the padding
  // rows and columns stay zero; slack columns keep the shifted vector reads of X in the buffer.
  const int64_t ldp = q_panels * NR + 2 * padding + V;
  const int64_t x_vecs = (gqw + V - 1) / V, ldx = x_vecs * V;
  const std::vector<float> qpack = pack_query(query, B, C, Hq, Wq, q_panels);

  std::vector<std::vector<float>> kpack;
  int64_t max_wkp = 0, max_gkw = 0;
  for (const OverlapKey& k : keys) {
    const int64_t w_blocks = (k.W + kRows - 1) / kRows;
    kpack.push_back(pack_key(k.data, B, C, k.H, k.W, w_blocks));
    max_wkp = std::max(max_wkp, k.W + 2 * padding);
    max_gkw = std::max(max_gkw, k.grid_w);
  }

  // Chunks of query patch rows, as few as give every thread the same number of (batch, chunk)
  // tasks: fewer chunks mean fewer halo rows. Any split gives the same results (each patch pair
  // is computed the same way in any chunk).
  const int64_t threads = at::get_num_threads();
  const int64_t n_chunks = std::clamp<int64_t>(threads / std::gcd(B, threads), 1, gqh);
  at::parallel_for(0, B * n_chunks, 1, [&](int64_t begin, int64_t end) {
    cpu_dispatch([&] {
    std::vector<float> pbuf(max_wkp * ldp, 0.0f);
    std::vector<float> ring(p * max_gkw * ldx, 0.0f);
    std::vector<float> best_v;
    std::vector<int32_t> best_i;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_chunks, chunk = task % n_chunks;
      const int64_t qa = gqh * chunk / n_chunks, qb = gqh * (chunk + 1) / n_chunks;
      best_v.assign((qb - qa) * ldx, -std::numeric_limits<float>::infinity());
      best_i.assign((qb - qa) * ldx, 0);
      for (size_t r = 0; r < keys.size(); ++r) {
        const OverlapKey& key = keys[r];
        const int64_t gkh = key.grid_h, gkw = key.grid_w;
        const int64_t w_blocks = (key.W + kRows - 1) / kRows;
        const int64_t k_row = w_blocks * kRows * C;
        const float* kb = kpack[r].data() + b * key.H * k_row;
        const float* inv_norm = key.inv_norm + b * gkh * gkw;
        // A wider key before this one may have left products in this key's padding rows.
        std::fill(pbuf.begin() + (padding + key.W) * ldp, pbuf.end(), 0.0f);
        for (int64_t d = qa - (gkh - 1); d < qb; ++d) {
          const int64_t qy0 = std::max(qa, d), qy1 = std::min(qb, gkh + d);
          if (qy0 >= qy1) continue;
          for (int64_t a = qy0; a < qy1 + p - 1; ++a) {
            // X_a (into ring slot a % p) from P_a = K(row a - d) . Q(row a); a padding row
            // on either side gives zeros.
            float* x = ring.data() + (a % p) * max_gkw * ldx;
            const int64_t qrow = a - padding, krow = a - d - padding;
            if (qrow < 0 || qrow >= Hq || krow < 0 || krow >= key.H) {
              std::fill(x, x + gkw * ldx, 0.0f);
            } else {
              // The next step reads query row qrow + 1 and key row krow + 1, which follow
              // these rows in memory: prefetch both.
              const float* krow_ptr = kb + krow * k_row;
              const float* qrow_ptr = qpack.data() + (b * Hq + qrow) * q_row;
              const void* next[2] = {krow_ptr + k_row, qrow_ptr + q_row};
              const bool last = qrow + 1 >= Hq || krow + 1 >= key.H;
              gemm_packed_rows(krow_ptr, key.W, qrow_ptr, q_panels, C,
                               pbuf.data() + padding * ldp + padding, ldp, last ? nullptr : next,
                               std::min(k_row, q_row) * int64_t(sizeof(float)));
              for (int64_t kx = 0; kx < gkw; ++kx) {
                for (int64_t v = 0; v < x_vecs; ++v) {
                  const float* pk = pbuf.data() + kx * ldp + v * V;
                  vf s = vload(pk);
                  for (int64_t dx = 1; dx < p; ++dx) s += vload(pk + dx * ldp + dx);
                  vstore(x + kx * ldx + v * V, s);
                }
              }
            }
            const int64_t qy = a - (p - 1);
            if (qy < qy0) continue;
            const int64_t ky = qy - d;
            const float* row_inv = inv_norm + ky * gkw;
            const int32_t idx0 = int32_t(key.offset + ky * gkw);
            for (int64_t v = 0; v < x_vecs; ++v) {
              float* bvp = best_v.data() + (qy - qa) * ldx + v * V;
              int32_t* bip = best_i.data() + (qy - qa) * ldx + v * V;
              vf bv = vload(bvp);
              vi bi;
              std::memcpy(&bi, bip, sizeof(bi));
              for (int64_t kx = 0; kx < gkw; ++kx) {
                vf s = vload(ring.data() + (qy % p) * max_gkw * ldx + kx * ldx + v * V);
                for (int64_t dy = 1; dy < p; ++dy) {
                  s += vload(ring.data() + ((qy + dy) % p) * max_gkw * ldx + kx * ldx + v * V);
                }
                const vf val = s * vset1(row_inv[kx]);
                const vi idx = vi{} + int32_t(idx0 + kx);
                const vi take = (val > bv) | ((val == bv) & (idx < bi));
                bv = take ? val : bv;
                bi = take ? idx : bi;
              }
              vstore(bvp, bv);
              std::memcpy(bip, &bi, sizeof(bi));
            }
          }
        }
      }
      for (int64_t qy = qa; qy < qb; ++qy) {
        for (int64_t qx = 0; qx < gqw; ++qx) {
          const int64_t cell = (b * gqh + qy) * gqw + qx;
          index[cell] = best_i[(qy - qa) * ldx + qx];
          score[cell] =
              float(double(best_v[(qy - qa) * ldx + qx]) / std::max(query_norms[cell], kNormEps));
        }
      }
    }
    });
  });
}

}  // namespace srntt
