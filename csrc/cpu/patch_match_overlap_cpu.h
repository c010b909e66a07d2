// Stride-1 patch matching from pixel-level dot products (declared here, see the .cpp).
//
// Fills, per query cell (b, qy, qx) row-major, its `kk` best (dot / max(|k|, eps), index) pairs
// (topk_cpu.h) into vals[cell * kk ...] and index[cell * kk ...]; for k = 1, its best pair and
// the keys within its near-tie band.
#pragma once

#include <cstdint>
#include <vector>

namespace srntt {

struct OverlapKey {
  const float* data;  // (B, C, H, W), contiguous
  int64_t H, W, grid_h, grid_w, offset;
  const float* inv_norm;  // (B, grid_h, grid_w): 1 / max(|k|, eps)
};

// The candidates of a k = 1 search that came within a query's near-tie band of its best.
struct BandCandidates {
  // Cells with two or more such candidates, ascending; cells[i]'s are [begin[i], begin[i + 1]).
  std::vector<int64_t> cells, begin{0};
  std::vector<float> vals;
  std::vector<int64_t> ids;
  // Cells with more than kBandSlots of them (an exact flat region, say): not listed.
  std::vector<int64_t> overflow;
};

// Candidates a query keeps within its band before it counts as overflowing.
constexpr int64_t kBandSlots = 8;

// kk >= 3: the kk best pairs of every cell.
void patch_match_overlap(const float* query, int64_t B, int64_t C, int64_t Hq, int64_t Wq,
                         const std::vector<OverlapKey>& keys, int64_t p, int64_t padding,
                         int64_t kk, float* vals, int64_t* index);

// The best pair of every cell, and in `band_candidates` every other key that scored at least
// best - band[cell] (float, rounded so that no such key is missed; a superset may be listed).
// A cell with band 0 (a zero query patch) lists nothing.
void patch_match_overlap_best(const float* query, int64_t B, int64_t C, int64_t Hq, int64_t Wq,
                              const std::vector<OverlapKey>& keys, int64_t p, int64_t padding,
                              const float* band, float* vals, int64_t* index,
                              BandCandidates* band_candidates);

}  // namespace srntt
