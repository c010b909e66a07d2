// L2 norms of every patch of a (B, C, H, W) map, from a box filter over per-pixel squared norms.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "srntt_geometry.h"

namespace srntt {

// Returns (B, grid_h, grid_w) norms, row-major, accumulated in double; patches are taken after
// zero padding, so padded pixels add nothing.
template <typename scalar_t>
std::vector<double> patch_norms(const scalar_t* x, int64_t B, int64_t C, int64_t H, int64_t W,
                                int64_t p, int64_t stride, int64_t padding) {
  const int64_t grid_h = grid_size(H, p, stride, padding);
  const int64_t grid_w = grid_size(W, p, stride, padding);
  std::vector<double> out(B * grid_h * grid_w);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    const int64_t Hp = H + 2 * padding, Wp = W + 2 * padding;
    std::vector<double> sq(Hp * Wp);
    std::vector<double> rows(grid_h * Wp);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(sq.begin(), sq.end(), 0.0);
      const scalar_t* xb = x + b * C * H * W;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t y = 0; y < H; ++y) {
          const scalar_t* src = xb + (c * H + y) * W;
          double* dst = sq.data() + (y + padding) * Wp + padding;
          for (int64_t xx = 0; xx < W; ++xx) dst[xx] += double(src[xx]) * double(src[xx]);
        }
      }
      // Separable box sum: rows first, then columns.
      for (int64_t gy = 0; gy < grid_h; ++gy) {
        double* dst = rows.data() + gy * Wp;
        for (int64_t xx = 0; xx < Wp; ++xx) dst[xx] = 0.0;
        for (int64_t dy = 0; dy < p; ++dy) {
          const double* src = sq.data() + (gy * stride + dy) * Wp;
          for (int64_t xx = 0; xx < Wp; ++xx) dst[xx] += src[xx];
        }
      }
      double* ob = out.data() + b * grid_h * grid_w;
      for (int64_t gy = 0; gy < grid_h; ++gy) {
        for (int64_t gx = 0; gx < grid_w; ++gx) {
          double s = 0.0;
          for (int64_t dx = 0; dx < p; ++dx) s += rows[gy * Wp + gx * stride + dx];
          ob[gy * grid_w + gx] = std::sqrt(s);
        }
      }
    }
  });
  return out;
}

}  // namespace srntt
