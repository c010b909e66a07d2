// Stride-1 patch matching from pixel-level dot products (declared here, see the .cpp).
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
                         const double* query_norms, int64_t* index, float* score);

}  // namespace srntt
