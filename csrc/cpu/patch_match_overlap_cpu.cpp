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
//
// For k = 1 each query patch keeps its best pair and lists the keys that score within its
// near-tie band of the best (BandLists); for larger k it keeps its `kk` best pairs (TopLists,
// topk_cpu.h). Either way the candidates of 8 query patches are tested against one threshold
// vector at once, and only a candidate that passes, rare once the best is good, takes the scalar
// update.
#include "cpu/patch_match_overlap_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>

#include "cpu/cpu_dispatch.h"
#include "cpu/gemm_tile_cpu.h"
#include "cpu/topk_cpu.h"
#include "srntt_geometry.h"

namespace srntt {
namespace {

constexpr int64_t NR = kPanel<float>;
constexpr int V = Vec<float>::size;
using vf = vec_t<float>;
using vi = Vec<float>::mask;

inline bool any_lane(vi m) {
  uint64_t w[sizeof(vi) / sizeof(uint64_t)];
  std::memcpy(w, &m, sizeof(w));
  uint64_t any = 0;
  for (const uint64_t x : w) any |= x;
  return any != 0;
}

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


// Chunks of query patch rows, as few as give every thread the same number of (batch, chunk)
// tasks: fewer chunks mean fewer halo rows. Any split gives the same results (each patch pair is
// computed the same way in any chunk).
int64_t row_chunks(int64_t B, int64_t gqh) {
  const int64_t threads = at::get_num_threads();
  return std::clamp<int64_t>(threads / std::gcd(B, threads), 1, gqh);
}

// The scan shared by both searches. `Lists` keeps the candidates of the query rows of one task:
//   Lists(ldx, gqw, kk_or_band): one per thread;
//   begin(task, b, qa, qb): task `task` (b * row_chunks + chunk), rows [qa, qb) of batch element b;
//   update(qy, v, idx0, gkw, candidate): the key row at key index idx0 against the 8 query patches
//     of vector v of query row qy, candidate(kx) giving their 8 values against key kx;
//   end(): the task is done.
template <typename Lists, typename Arg>
void overlap_scan(const float* query, int64_t B, int64_t C, int64_t Hq, int64_t Wq,
                  const std::vector<OverlapKey>& keys, int64_t p, int64_t padding, Arg arg) {
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

  const int64_t n_chunks = row_chunks(B, gqh);
  at::parallel_for(0, B * n_chunks, 1, [&](int64_t begin, int64_t end) {
    cpu_dispatch([&] {
    std::vector<float> pbuf(max_wkp * ldp, 0.0f);
    std::vector<float> ring(p * max_gkw * ldx, 0.0f);
    Lists lists(ldx, gqw, arg);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_chunks, chunk = task % n_chunks;
      const int64_t qa = gqh * chunk / n_chunks, qb = gqh * (chunk + 1) / n_chunks;
      lists.begin(task, b, qa, qb);
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
              const auto candidate = [&](int64_t kx) {
                vf s = vload(ring.data() + (qy % p) * max_gkw * ldx + kx * ldx + v * V);
                for (int64_t dy = 1; dy < p; ++dy) {
                  s += vload(ring.data() + ((qy + dy) % p) * max_gkw * ldx + kx * ldx + v * V);
                }
                return s * vset1(row_inv[kx]);
              };
              lists.update(qy, v, idx0, gkw, candidate);
            }
          }
        }
      }
      lists.end();
    }
    });
  });
}

// The kk best pairs per query patch, [query row][slot][ldx]: slot s of 8 query patches is one
// vector. The candidates of 8 query patches are tested against the lists' last slots at once;
// only a candidate that enters a list, rare once the lists fill, takes the scalar insertion.
struct TopLists {
  struct Out {
    int64_t kk, gqh;
    float* vals;
    int64_t* index;
  };
  int64_t ldx, gqw;
  Out out;
  int64_t b = 0, qa = 0, qb = 0;
  std::vector<float> best_v;
  std::vector<int32_t> best_i;

  TopLists(int64_t ldx_, int64_t gqw_, Out out_) : ldx(ldx_), gqw(gqw_), out(out_) {}

  void begin(int64_t, int64_t b_, int64_t qa_, int64_t qb_) {
    b = b_, qa = qa_, qb = qb_;
    best_v.assign((qb - qa) * out.kk * ldx, -std::numeric_limits<float>::infinity());
    best_i.assign((qb - qa) * out.kk * ldx, std::numeric_limits<int32_t>::max());
  }

  template <typename Candidate>
  void update(int64_t qy, int64_t v, int32_t idx0, int64_t gkw, const Candidate& candidate) {
    const int64_t kk = out.kk;
    float* bvp = best_v.data() + (qy - qa) * kk * ldx + v * V;
    int32_t* bip = best_i.data() + (qy - qa) * kk * ldx + v * V;
    const float* last_v = bvp + (kk - 1) * ldx;
    const int32_t* last_i = bip + (kk - 1) * ldx;
    vf lv = vload(last_v);
    vi li;
    std::memcpy(&li, last_i, sizeof(li));
    for (int64_t kx = 0; kx < gkw; ++kx) {
      const vf val = candidate(kx);
      const int32_t id = int32_t(idx0 + kx);
      const vi enters = (val > lv) | ((val == lv) & (vi{} + id < li));
      if (!any_lane(enters)) continue;
      for (int l = 0; l < V; ++l) {
        if (enters[l]) insert_ranked(bvp + l, bip + l, ldx, kk, float(val[l]), id);
      }
      lv = vload(last_v);
      std::memcpy(&li, last_i, sizeof(li));
    }
  }

  void end() {
    const int64_t kk = out.kk;
    for (int64_t qy = qa; qy < qb; ++qy) {
      for (int64_t qx = 0; qx < gqw; ++qx) {
        const int64_t cell = (b * out.gqh + qy) * gqw + qx;
        for (int64_t slot = 0; slot < kk; ++slot) {
          out.vals[cell * kk + slot] = best_v[((qy - qa) * kk + slot) * ldx + qx];
          out.index[cell * kk + slot] = best_i[((qy - qa) * kk + slot) * ldx + qx];
        }
      }
    }
  }
};

// The best pair per query patch, [query row][ldx], and the candidates within its band.
//
// The common path costs one compare per 8 candidates: a candidate is looked at only if it scores
// at least thr = best - band of its query (thr = best for a query with band 0; +inf for the slack
// lanes beyond the grid and for a query whose band overflowed). Such a candidate updates the best
// and, for a query with a band, joins its list. Every key that ends within the band of the final
// best scored at least the then best minus band when it came, so the list holds it: the best
// only grows. A full list first drops the entries that fell below thr; a list still full
// overflows, and its query stops looking (it is searched again in full).
//
// NB: thr = best - band is rounded in float; band[cell] carries a margin over the exact band
// (larger than the rounding of best, which is at most |q| in magnitude), so thr never lies above
// the exact best - band and no key within the band is missed.
struct BandLists {
  struct Out {
    int64_t gqh;
    const float* band;
    float* vals;
    int64_t* index;
    std::vector<BandCandidates>* tasks;  // one per task, merged in order afterwards
  };
  int64_t ldx, gqw;
  Out out;
  int64_t task = 0, b = 0, qa = 0, qb = 0;
  std::vector<float> best_v, thr;
  std::vector<int32_t> best_i, count;
  // Slot lists are written only on the rare path: left uninitialized, pages are touched as used.
  std::unique_ptr<float[]> slot_v;
  std::unique_ptr<int32_t[]> slot_i;
  int64_t slots_size = 0;

  BandLists(int64_t ldx_, int64_t gqw_, Out out_) : ldx(ldx_), gqw(gqw_), out(out_) {}

  void begin(int64_t task_, int64_t b_, int64_t qa_, int64_t qb_) {
    task = task_, b = b_, qa = qa_, qb = qb_;
    const int64_t n = (qb - qa) * ldx;
    best_v.assign(n, -std::numeric_limits<float>::infinity());
    best_i.assign(n, std::numeric_limits<int32_t>::max());
    count.assign(n, 0);
    thr.assign(n, std::numeric_limits<float>::infinity());
    for (int64_t qy = qa; qy < qb; ++qy) {
      std::fill_n(thr.begin() + (qy - qa) * ldx, gqw, -std::numeric_limits<float>::infinity());
    }
    if (slots_size < n * kBandSlots) {
      slots_size = n * kBandSlots;
      slot_v.reset(new float[slots_size]);
      slot_i.reset(new int32_t[slots_size]);
    }
  }

  // The rare path for query patch `at` (position in the task's lists) and candidate (x, id).
  void take(int64_t at, float x, int32_t id) {
    if (ranks_above(x, id, best_v[at], best_i[at])) {
      best_v[at] = x;
      best_i[at] = id;
    }
    const int64_t qy = qa + at / ldx, qx = at % ldx;
    int32_t& n = count[at];
    // A slack lane or an overflowed list looks no further (an infinite value can still come).
    if (qx >= gqw || n < 0) return;
    const float band = out.band[(b * out.gqh + qy) * gqw + qx];
    if (!(band > 0)) {
      thr[at] = best_v[at];
      return;
    }
    const float t = best_v[at] - band;
    float* sv = slot_v.get() + at * kBandSlots;
    int32_t* si = slot_i.get() + at * kBandSlots;
    if (n == kBandSlots) {
      int32_t kept = 0;
      for (int32_t s = 0; s < n; ++s) {
        if (sv[s] >= t) sv[kept] = sv[s], si[kept++] = si[s];
      }
      n = kept;
    }
    if (n == kBandSlots) {
      n = -1;
      thr[at] = std::numeric_limits<float>::infinity();
      return;
    }
    sv[n] = x;
    si[n++] = id;
    thr[at] = t;
  }

  template <typename Candidate>
  void update(int64_t qy, int64_t v, int32_t idx0, int64_t gkw, const Candidate& candidate) {
    const int64_t row = (qy - qa) * ldx + v * V;
    vf t = vload(thr.data() + row);
    for (int64_t kx = 0; kx < gkw; ++kx) {
      const vf val = candidate(kx);
      const vi look = val >= t;
      if (!any_lane(look)) continue;
      for (int l = 0; l < V; ++l) {
        if (look[l]) take(row + l, val[l], idx0 + int32_t(kx));
      }
      t = vload(thr.data() + row);
    }
  }

  void end() {
    BandCandidates& res = (*out.tasks)[task];
    for (int64_t qy = qa; qy < qb; ++qy) {
      for (int64_t qx = 0; qx < gqw; ++qx) {
        const int64_t at = (qy - qa) * ldx + qx;
        const int64_t cell = (b * out.gqh + qy) * gqw + qx;
        out.vals[cell] = best_v[at];
        out.index[cell] = best_i[at];
        if (count[at] < 0) res.overflow.push_back(cell);
        if (count[at] < 2) continue;
        res.cells.push_back(cell);
        for (int32_t s = 0; s < count[at]; ++s) {
          res.vals.push_back(slot_v[at * kBandSlots + s]);
          res.ids.push_back(slot_i[at * kBandSlots + s]);
        }
        res.begin.push_back(int64_t(res.ids.size()));
      }
    }
  }
};

}  // namespace

void patch_match_overlap(const float* query, int64_t B, int64_t C, int64_t Hq, int64_t Wq,
                         const std::vector<OverlapKey>& keys, int64_t p, int64_t padding,
                         int64_t kk, float* vals, int64_t* index) {
  overlap_scan<TopLists>(query, B, C, Hq, Wq, keys, p, padding,
                         TopLists::Out{kk, grid_size(Hq, p, int64_t(1), padding), vals, index});
}

void patch_match_overlap_best(const float* query, int64_t B, int64_t C, int64_t Hq, int64_t Wq,
                              const std::vector<OverlapKey>& keys, int64_t p, int64_t padding,
                              const float* band, float* vals, int64_t* index,
                              BandCandidates* band_candidates) {
  const int64_t gqh = grid_size(Hq, p, int64_t(1), padding);
  std::vector<BandCandidates> tasks(B * row_chunks(B, gqh));
  overlap_scan<BandLists>(query, B, C, Hq, Wq, keys, p, padding,
                          BandLists::Out{gqh, band, vals, index, &tasks});
  BandCandidates& res = *band_candidates;
  for (const BandCandidates& t : tasks) {
    for (size_t i = 0; i < t.cells.size(); ++i) {
      res.cells.push_back(t.cells[i]);
      for (int64_t j = t.begin[i]; j < t.begin[i + 1]; ++j) {
        res.vals.push_back(t.vals[j]);
        res.ids.push_back(t.ids[j]);
      }
      res.begin.push_back(int64_t(res.ids.size()));
    }
    res.overflow.insert(res.overflow.end(), t.overflow.begin(), t.overflow.end());
  }
}

}  // namespace srntt
