// Stride-1 patch matching from pixel-level dot products (declared here, see the .cpp).
//
// Fills, per query cell (b, qy, qx) row-major, its `kk` best (dot / max(|k|, eps), index) pairs
// (topk_cpu.h) into vals[cell * kk ...] and index[cell * kk ...].
#pragma once

#include <cstdint>
#include <vector>

namespace srntt {

struct OverlapKey {
  const float* data;  // (B, C, H, W), contiguous
  int64_t H, W, grid_h, grid_w, offset;
  const float* inv_norm;  // (B, grid_h, grid_w): 1 / max(|k|, eps)
};

void patch_match_overlap(const float* query, int64_t B, int64_t C, int64_t Hq, int64_t Wq,
                         const std::vector<OverlapKey>& keys, int64_t p, int64_t padding,
                         int64_t kk, float* vals, int64_t* index);

}  // namespace srntt
