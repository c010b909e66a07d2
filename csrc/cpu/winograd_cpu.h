// Winograd F(4x4, 3x3) convolution on the CPU: 3x3 kernel, stride 1, zero padding 1, NHWC float32.
//
// Each 4x4 output tile is computed from a 6x6 input tile with 36 element-wise products per
// (cin, cout) pair instead of 144 multiplies (Lavin & Gray, "Fast Algorithms for Convolutional
// Neural Networks", 2016), with the interpolation points 0, +-1, +-2 and infinity:
//
//   V = B^T d B (input tile), U = G g G^T (filter), M = U . V per point, Y = A^T M A.
//
// Tiles are processed in blocks of kBlockRows-aligned counts: the input transform of a block writes
// V (36 x tiles x Cin), 36 GEMMs (tiles x Cin) x (Cin x Cout) write M (36 x tiles x Cout), and the
// output transform turns M into the 4x4 tiles, adds bias and the residual, applies the ReLU and
// stores the part of each tile inside the image. A block is sized so that V and M stay in L2.
//
// NB: the transforms' coefficients (up to 5 in B^T, 8 in A^T, 1/24 in G) amplify float32 rounding:
// the error relative to the convolution of |x| and |w| is a few 1e-6 (tests/test_winograd.py
// measures it), some ten times that of a direct convolution. The filter transform is done in
// double and rounded once.
//
// Torch-free: raw pointers and sizes; the binding (winograd_cpu.cpp) checks the arguments, owns
// the threads (one call of winograd_tiles per range of tile blocks) and picks the CPU variant.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/gemm_tile_cpu.h"

namespace srntt {
namespace winograd {

constexpr int kAlpha = 6;                   // input tile side
constexpr int kPoints = kAlpha * kAlpha;    // products per (tile, cin, cout)
constexpr int kTile = 4;                    // output tile side
constexpr int64_t kBlockRows = 6;           // GEMM micro-tile rows (tiles)
constexpr int64_t kPanelCols = 16;          // GEMM micro-tile columns (output channels)
constexpr int64_t kChannelAlign = 8;        // channels per vector; Cin and Cout are multiples

// Filter transform of one (cout, cin) filter g (3x3, row-major), in double: u = G g G^T (6x6).
inline void transform_filter(const float* g, double* u) {
  static constexpr double G[kAlpha][3] = {
      {1.0 / 4, 0, 0},
      {-1.0 / 6, -1.0 / 6, -1.0 / 6},
      {-1.0 / 6, 1.0 / 6, -1.0 / 6},
      {1.0 / 24, 1.0 / 12, 1.0 / 6},
      {1.0 / 24, -1.0 / 12, 1.0 / 6},
      {0, 0, 1}};
  double t[kAlpha][3];
  for (int i = 0; i < kAlpha; ++i)
    for (int j = 0; j < 3; ++j)
      t[i][j] = G[i][0] * g[0 * 3 + j] + G[i][1] * g[1 * 3 + j] + G[i][2] * g[2 * 3 + j];
  for (int i = 0; i < kAlpha; ++i)
    for (int j = 0; j < kAlpha; ++j)
      u[i * kAlpha + j] = t[i][0] * G[j][0] + t[i][1] * G[j][1] + t[i][2] * G[j][2];
}

// The packed filters of point p start at p * cin * cout; within a point, output channels are in
// panels of kPanelCols (the last one 8 wide when cout % 16 == 8), panel j at j * kPanelCols * cin,
// each cin rows of its width: the GEMM's B operand read as one contiguous stream.
inline int64_t panel_width(int64_t cout, int64_t j) {
  return std::min<int64_t>(kPanelCols, cout - j * kPanelCols);
}

// weight (cout, cin, 3, 3) -> packed (36, cin, cout) in the panel layout above.
inline void pack_filters(const float* weight, int64_t cout, int64_t cin, float* packed,
                         int64_t co_begin, int64_t co_end) {
  double u[kPoints];
  for (int64_t co = co_begin; co < co_end; ++co) {
    const int64_t j = co / kPanelCols, w = panel_width(cout, j), col = co % kPanelCols;
    for (int64_t ci = 0; ci < cin; ++ci) {
      transform_filter(weight + (co * cin + ci) * 9, u);
      for (int p = 0; p < kPoints; ++p)
        packed[p * cin * cout + j * kPanelCols * cin + ci * w + col] = float(u[p]);
    }
  }
}

// Tiles per block: V and M of a block (36 x tiles x (cin + cout) floats) fit in ~512 KB of L2,
// at least one micro-tile row block, at most 16 of them.
inline int64_t block_tiles(int64_t cin, int64_t cout) {
  const int64_t fit = (int64_t(512) << 10) / (int64_t(sizeof(float)) * kPoints * (cin + cout));
  const int64_t rows = std::clamp<int64_t>(fit / kBlockRows, 1, 16);
  return rows * kBlockRows;
}

// Rows of V and M for `rows` tiles: whole micro-tiles.
inline int64_t padded_rows(int64_t rows) { return (rows + kBlockRows - 1) / kBlockRows * kBlockRows; }

// Floats from one point's matrix (V or M) to the next, for `rows` tiles of `channels`.
// NB: one extra cache line, so that the 36 points of a tile, which the transforms read or write
// together, do not fall into the same few L1 sets (rows * channels * 4 bytes is a multiple of 4 KiB
// or of 2 KiB for most layer widths: 36 addresses that conflict in an 8-way cache).
inline int64_t point_stride(int64_t rows, int64_t channels) {
  return padded_rows(rows) * channels + 16;
}

// Floats of per-thread workspace: V and M of one block.
inline int64_t workspace_floats(int64_t cin, int64_t cout) {
  const int64_t block = block_tiles(cin, cout);
  return kPoints * (point_stride(block, cin) + point_stride(block, cout));
}

struct Conv {
  const float* x;       // (n, h, w, cin)
  const float* packed;  // pack_filters
  const float* bias;    // (cout) or null
  const float* other;   // (n, h, w, cout) or null
  float* y;             // (n, h, w, cout)
  int64_t n, h, w, cin, cout;
  bool relu;
  int64_t tiles_h() const { return (h + kTile - 1) / kTile; }
  int64_t tiles_w() const { return (w + kTile - 1) / kTile; }
  int64_t tiles() const { return n * tiles_h() * tiles_w(); }
};

using vf = vec_t<float>;

// V[p][row][c0 .. c0 + 8) for the 6x6 input tile d (36 vectors, row-major) = B^T d B.
inline void input_transform(const vf* d, float* v, int64_t ps) {
  vf t[kAlpha][kAlpha];
  for (int j = 0; j < kAlpha; ++j) {
    const vf d0 = d[0 * kAlpha + j], d1 = d[1 * kAlpha + j], d2 = d[2 * kAlpha + j];
    const vf d3 = d[3 * kAlpha + j], d4 = d[4 * kAlpha + j], d5 = d[5 * kAlpha + j];
    t[0][j] = 4.0f * d0 - 5.0f * d2 + d4;
    t[1][j] = -4.0f * (d1 + d2) + (d3 + d4);
    t[2][j] = 4.0f * (d1 - d2) + (d4 - d3);
    t[3][j] = 2.0f * (d3 - d1) + (d4 - d2);
    t[4][j] = 2.0f * (d1 - d3) + (d4 - d2);
    t[5][j] = 4.0f * d1 - 5.0f * d3 + d5;
  }
  for (int i = 0; i < kAlpha; ++i) {
    const vf d0 = t[i][0], d1 = t[i][1], d2 = t[i][2], d3 = t[i][3], d4 = t[i][4], d5 = t[i][5];
    float* row = v + i * kAlpha * ps;
    vstore(row + 0 * ps, 4.0f * d0 - 5.0f * d2 + d4);
    vstore(row + 1 * ps, -4.0f * (d1 + d2) + (d3 + d4));
    vstore(row + 2 * ps, 4.0f * (d1 - d2) + (d4 - d3));
    vstore(row + 3 * ps, 2.0f * (d3 - d1) + (d4 - d2));
    vstore(row + 4 * ps, 2.0f * (d1 - d3) + (d4 - d2));
    vstore(row + 5 * ps, 4.0f * d1 - 5.0f * d3 + d5);
  }
}

// Rows [0, rows) of the block's V: tile `first + row`'s transformed input, all channels. Rows up to
// the next multiple of kBlockRows are zero (the GEMM computes whole micro-tiles).
inline void transform_inputs(const Conv& cv, int64_t first, int64_t rows, float* V) {
  const int64_t th = cv.tiles_h(), tw = cv.tiles_w();
  const int64_t ps = point_stride(rows, cv.cin);
  for (int64_t r = rows; r < padded_rows(rows); ++r)
    for (int p = 0; p < kPoints; ++p) std::fill_n(V + p * ps + r * cv.cin, cv.cin, 0.0f);
  vf d[kPoints];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = first + r;
    const int64_t b = t / (th * tw), ty = (t / tw) % th, tx = t % tw;
    const int64_t y0 = ty * kTile - 1, x0 = tx * kTile - 1;
    const bool inside = y0 >= 0 && x0 >= 0 && y0 + kAlpha <= cv.h && x0 + kAlpha <= cv.w;
    const float* img = cv.x + b * cv.h * cv.w * cv.cin;
    for (int64_t c = 0; c < cv.cin; c += kChannelAlign) {
      if (inside) {
        for (int i = 0; i < kAlpha; ++i)
          for (int j = 0; j < kAlpha; ++j)
            d[i * kAlpha + j] = vload(img + ((y0 + i) * cv.w + x0 + j) * cv.cin + c);
      } else {
        for (int i = 0; i < kAlpha; ++i)
          for (int j = 0; j < kAlpha; ++j) {
            const int64_t yy = y0 + i, xx = x0 + j;
            d[i * kAlpha + j] = yy >= 0 && yy < cv.h && xx >= 0 && xx < cv.w
                                    ? vload(img + (yy * cv.w + xx) * cv.cin + c)
                                    : vf{};
          }
      }
      input_transform(d, V + r * cv.cin + c, ps);
    }
  }
}

// C (kBlockRows x NV*8, row stride ldc) = A (kBlockRows x K, row stride lda) * B (K x NV*8).
template <int NV, bool kAvx2>
inline void micro(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t K,
                  float* __restrict c, int64_t ldc) {
  constexpr int V = Vec<float>::size;
  constexpr int R = int(kBlockRows);
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    vf bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vload(b + k * NV * V + v * V);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      vf ar;
#ifdef SRNTT_CPU_DISPATCH
      if constexpr (kAvx2) {
        ar = vbroadcast(a + r * lda + k);
      } else {
        ar = vset1(a[r * lda + k]);
      }
#else
      ar = vset1(a[r * lda + k]);
#endif
      for (int v = 0; v < NV; ++v) acc[r][v] = vfma(ar, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(c + r * ldc + v * V, acc[r][v]);
}

// Cache lines to prefetch while the GEMMs of a block run (they are bound by the FMAs, not by
// memory): the image rows the next block's input transform reads and those this block's output
// transform writes (and reads, for the residual). Without it the transforms wait on L3 and DRAM.
class Prefetch {
 public:
  // The rows of `channels`-wide pixels of `base` that tiles [t0, t1) cover: their 6x6 input tiles
  // (`input`) or their 4x4 output tiles, clipped to the image.
  void add(const Conv& cv, int64_t t0, int64_t t1, bool input, const float* base,
           int64_t channels, bool write) {
    const int64_t th = cv.tiles_h(), tw = cv.tiles_w();
    const int64_t lo = input ? -1 : 0, side = input ? kAlpha : kTile;
    for (int64_t t = t0; t < t1;) {
      const int64_t b = t / (th * tw), ty = (t / tw) % th, tx = t % tw;
      const int64_t n = std::min(t1 - t, tw - tx);
      const int64_t ya = std::max<int64_t>(0, ty * kTile + lo);
      const int64_t yb = std::min(cv.h, ty * kTile + lo + side);
      const int64_t xa = std::max<int64_t>(0, tx * kTile + lo);
      const int64_t xb = std::min(cv.w, (tx + n - 1) * kTile + lo + side);
      for (int64_t y = ya; y < yb; ++y) {
        const float* p = base + ((b * cv.h + y) * cv.w + xa) * channels;
        ranges_.push_back({reinterpret_cast<const char*>(p), (xb - xa) * channels * 4, write});
        lines_ += ((xb - xa) * channels * 4 + 63) / 64;
      }
      t += n;
    }
  }

  // Issues the next 1/parts of the lines.
  void step(int64_t parts) {
    for (int64_t k = (lines_ + parts - 1) / parts; k > 0 && next_ < ranges_.size(); --k) {
      const Range& r = ranges_[next_];
      if (r.write) {
        __builtin_prefetch(r.ptr + offset_, 1, 2);
      } else {
        __builtin_prefetch(r.ptr + offset_, 0, 2);
      }
      offset_ += 64;
      if (offset_ >= r.bytes) {
        ++next_;
        offset_ = 0;
      }
    }
  }

  void clear() {
    ranges_.clear();
    next_ = 0;
    offset_ = 0;
    lines_ = 0;
  }

 private:
  struct Range {
    const char* ptr;
    int64_t bytes;
    bool write;
  };
  std::vector<Range> ranges_;
  size_t next_ = 0;
  int64_t offset_ = 0, lines_ = 0;
};

// M[p] (rows x cout) = V[p] (rows x cin) * U[p] (cin x cout) for the 36 points.
template <bool kAvx2>
inline void multiply(const Conv& cv, int64_t rows, const float* V, float* M, Prefetch& prefetch) {
  const int64_t stride = padded_rows(rows);
  const int64_t panels = (cv.cout + kPanelCols - 1) / kPanelCols;
  const int64_t parts = kPoints * panels * (stride / kBlockRows);  // micro-tiles
  for (int p = 0; p < kPoints; ++p) {
    const float* a = V + p * point_stride(rows, cv.cin);
    float* m = M + p * point_stride(rows, cv.cout);
    const float* u = cv.packed + p * cv.cin * cv.cout;
    for (int64_t j = 0; j < panels; ++j) {
      const float* bp = u + j * kPanelCols * cv.cin;
      const bool wide = panel_width(cv.cout, j) == kPanelCols;
      for (int64_t i = 0; i < stride; i += kBlockRows) {
        prefetch.step(parts);
        if (wide) {
          micro<2, kAvx2>(a + i * cv.cin, cv.cin, bp, cv.cin, m + i * cv.cout + j * kPanelCols,
                          cv.cout);
        } else {
          micro<1, kAvx2>(a + i * cv.cin, cv.cin, bp, cv.cin, m + i * cv.cout + j * kPanelCols,
                          cv.cout);
        }
      }
    }
  }
}

// Y = A^T M A for rows [0, rows) of the block, plus bias and residual, ReLU, stored where the tile
// lies inside the image.
inline void transform_outputs(const Conv& cv, int64_t first, int64_t rows, const float* M) {
  const int64_t th = cv.tiles_h(), tw = cv.tiles_w();
  const int64_t ps = point_stride(rows, cv.cout);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = first + r;
    const int64_t b = t / (th * tw), ty = (t / tw) % th, tx = t % tw;
    const int64_t y0 = ty * kTile, x0 = tx * kTile;
    const int64_t vh = std::min<int64_t>(kTile, cv.h - y0), vw = std::min<int64_t>(kTile, cv.w - x0);
    const int64_t base = ((b * cv.h + y0) * cv.w + x0) * cv.cout;
    for (int64_t c = 0; c < cv.cout; c += kChannelAlign) {
      const float* m = M + r * cv.cout + c;
      vf s[kTile][kAlpha];
      for (int j = 0; j < kAlpha; ++j) {
        const vf m0 = vload(m + (0 * kAlpha + j) * ps), m1 = vload(m + (1 * kAlpha + j) * ps);
        const vf m2 = vload(m + (2 * kAlpha + j) * ps), m3 = vload(m + (3 * kAlpha + j) * ps);
        const vf m4 = vload(m + (4 * kAlpha + j) * ps), m5 = vload(m + (5 * kAlpha + j) * ps);
        const vf a12 = m1 + m2, s12 = m1 - m2, a34 = m3 + m4, s34 = m3 - m4;
        s[0][j] = m0 + a12 + a34;
        s[1][j] = s12 + 2.0f * s34;
        s[2][j] = a12 + 4.0f * a34;
        s[3][j] = s12 + 8.0f * s34 + m5;
      }
      const vf bias = cv.bias ? vload(cv.bias + c) : vf{};
      for (int i = 0; i < vh; ++i) {
        const vf m0 = s[i][0], m1 = s[i][1], m2 = s[i][2], m3 = s[i][3], m4 = s[i][4], m5 = s[i][5];
        const vf a12 = m1 + m2, s12 = m1 - m2, a34 = m3 + m4, s34 = m3 - m4;
        vf o[kTile] = {m0 + a12 + a34, s12 + 2.0f * s34, a12 + 4.0f * a34, s12 + 8.0f * s34 + m5};
        for (int j = 0; j < vw; ++j) {
          const int64_t at = base + (i * cv.w + j) * cv.cout + c;
          vf out = o[j] + bias;
          if (cv.other) out += vload(cv.other + at);
          if (cv.relu) out = out > 0.0f ? out : vf{};
          vstore(cv.y + at, out);
        }
      }
    }
  }
}

// Tiles [first, last) of the convolution; `work` holds workspace_floats(cin, cout) floats.
template <bool kAvx2>
inline void winograd_tiles(const Conv& cv, int64_t first, int64_t last, float* work) {
  const int64_t block = block_tiles(cv.cin, cv.cout);
  float* V = work;
  float* M = work + kPoints * point_stride(block, cv.cin);
  Prefetch prefetch;
  for (int64_t t = first; t < last; t += block) {
    const int64_t rows = std::min(block, last - t);
    transform_inputs(cv, t, rows, V);
    prefetch.clear();
    prefetch.add(cv, t, t + rows, false, cv.y, cv.cout, true);
    if (cv.other) prefetch.add(cv, t, t + rows, false, cv.other, cv.cout, false);
    const int64_t next = std::min(t + rows + block, last);
    prefetch.add(cv, t + rows, next, true, cv.x, cv.cin, false);
    multiply<kAvx2>(cv, rows, V, M, prefetch);
    transform_outputs(cv, t, rows, M);
  }
}

}  // namespace winograd
}  // namespace srntt
