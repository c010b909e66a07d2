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
#include <cstdint>
#include <vector>

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
  TORCH_CHECK(sizes.size() % 2 == 0 && !sizes.empty(), "_feature_swap_fused: bad value sizes");
  ValueGrids g;
  for (size_t r = 0; r < sizes.size(); r += 2) {
    const int64_t hk = sizes[r] / scale, wk = sizes[r + 1] / scale;
    const int64_t gh = (hk + 2 * padding - p) / stride + 1;
    const int64_t gw = (wk + 2 * padding - p) / stride + 1;
    TORCH_CHECK(hk + 2 * padding >= p && wk + 2 * padding >= p,
                "_feature_swap_fused: a values map is smaller than one patch");
    g.H.push_back(sizes[r]);
    g.W.push_back(sizes[r + 1]);
    g.grid_w.push_back(gw);
    g.offset.push_back(g.total);
    g.total += gh * gw;
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

// A horizontal run of `len` pixels: values[ref] plane offset `src`, output row offset `dst`.
struct Segment {
  int32_t ref;
  int64_t src, dst, len;
};

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

at::Tensor feature_swap_fused_cpu(at::TensorList values_in, const at::Tensor& index_in,
                                  int64_t patch_size, int64_t stride, int64_t padding,
                                  int64_t scale, int64_t out_h, int64_t out_w,
                                  c10::string_view reduce) {
  check_reduce(reduce);
  TORCH_CHECK(!values_in.empty(), "_feature_swap_fused: values must not be empty");
  TORCH_CHECK(index_in.dim() == 3 && index_in.scalar_type() == at::kLong,
              "_feature_swap_fused: index must be int64 (B, Gh, Gw)");
  TORCH_CHECK(patch_size >= 1 && stride >= 1 && padding >= 0 && scale >= 1 && out_h >= 0 &&
                  out_w >= 0,
              "_feature_swap_fused: bad patch_size/stride/padding/scale/out size");
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
  at::Tensor out = at::zeros({B, Cv, out_h, out_w}, values[0].options());
  if (out.numel() == 0 || index.numel() == 0) return out;

  const ValueGrids g = value_grids(sizes, patch_size, stride, padding, scale);
  const Windows w = decode_index(index, g, stride, padding, scale);
  const int64_t win = patch_size * scale, step = stride * scale, off = padding * scale;
  const bool mean = reduce == "mean";
  const std::vector<int64_t> count_h = coverage(out_h, gqh, step, off, win);
  const std::vector<int64_t> count_w = coverage(out_w, gqw, step, off, win);

  // Segments of every (batch, output row), built once and replayed for every channel.
  std::vector<std::vector<Segment>> rows(B * out_h);
  at::parallel_for(0, B * out_h, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / out_h, y = task % out_h;
      std::vector<Segment>& segs = rows[task];
      // Query rows i whose output window [i*step - off, i*step - off + win) holds y.
      const int64_t i_lo = floor_div(y + off - win, step) + 1;
      for (int64_t i = std::max<int64_t>(0, i_lo); i < gqh; ++i) {
        const int64_t top = i * step - off;
        if (top > y) break;
        const int64_t dy = y - top;
        for (int64_t j = 0; j < gqw; ++j) {
          const int64_t cell = (b * gqh + i) * gqw + j;
          const int32_t r = w.ref[cell];
          const int64_t sy = w.top[cell] + dy;
          if (sy < 0 || sy >= g.H[r]) continue;
          const int64_t left = j * step - off, sx = w.left[cell];
          const int64_t lo = std::max<int64_t>({0, -left, -sx});
          const int64_t hi = std::min<int64_t>({win, out_w - left, g.W[r] - sx});
          if (lo >= hi) continue;
          segs.push_back({r, sy * g.W[r] + sx + lo, left + lo, hi - lo});
        }
      }
    }
  });

  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "_feature_swap_fused_cpu", [&] {
    std::vector<const scalar_t*> vptr;
    for (const at::Tensor& v : values) vptr.push_back(v.data_ptr<scalar_t>());
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    std::vector<scalar_t> divisor;
    if (mean) {
      divisor.resize(out_h * out_w);
      for (int64_t y = 0; y < out_h; ++y) {
        for (int64_t x = 0; x < out_w; ++x) {
          const int64_t n = count_h[y] * count_w[x];  // uncovered pixels stay 0
          divisor[y * out_w + x] = n > 0 ? scalar_t(n) : scalar_t(1);
        }
      }
    }
    // One (batch, channel) plane per task: its values planes and output plane stay in cache.
    at::parallel_for(0, B * Cv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / Cv;
        std::vector<const scalar_t*> src_plane(vptr.size());
        for (size_t r = 0; r < vptr.size(); ++r) src_plane[r] = vptr[r] + task * g.H[r] * g.W[r];
        scalar_t* dst_plane = out_ptr + task * out_h * out_w;
        for (int64_t y = 0; y < out_h; ++y) {
          scalar_t* dst = dst_plane + y * out_w;
          for (const Segment& seg : rows[b * out_h + y]) {
            add_run(dst + seg.dst, src_plane[seg.ref] + seg.src, seg.len);
          }
        }
        if (mean) {
          for (int64_t i = 0; i < out_h * out_w; ++i) dst_plane[i] /= divisor[i];
        }
      }
    });
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
  TORCH_CHECK(patch_size >= 1 && stride >= 1 && padding >= 0 && scale >= 1,
              "_feature_swap_fused_backward: bad patch_size/stride/padding/scale");
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
  return grads;
}

}  // namespace
}  // namespace srntt

TORCH_LIBRARY_IMPL(srntt, CPU, m) {
  m.impl("_feature_swap_fused", &srntt::feature_swap_fused_cpu);
  m.impl("_feature_swap_fused_backward", &srntt::feature_swap_fused_backward_cpu);
}
