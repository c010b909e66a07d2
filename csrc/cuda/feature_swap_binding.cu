// CUDA kernels of srntt::_feature_swap_fused and srntt::_feature_swap_fused_backward (semantics:
// docs/DESIGN.md, "feature_swap semantics"). This file only checks arguments, sets the device, takes
// the current stream, dispatches the dtype and allocates the workspace; the kernels are torch-free,
// in feature_swap.cuh.
//
// NB: index values are not range-checked here (that would synchronize with the device); the public
// API validates them (docs/CONTRACT.md §6), and out-of-range values contribute nothing in the kernels.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cuda/feature_swap.cuh"
#include "srntt_limits.h"

namespace srntt {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

// float16 / bfloat16 are swapped in float32 and rounded once at the end, as on the CPU (sums of up
// to patch_size^2 terms would otherwise round at every step).
bool is_reduced_float(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

bool parse_reduce(c10::string_view reduce, const char* op) {
  TORCH_CHECK(reduce == "sum" || reduce == "mean", op, ": reduce must be 'sum' or 'mean', got '",
              std::string(reduce.data(), reduce.size()), "'");
  return reduce == "mean";
}

void check_params(const char* op, int64_t patch_size, int64_t stride, int64_t padding, int64_t scale) {
  TORCH_CHECK(patch_size >= 1 && stride >= 1 && padding >= 0 && scale >= 1 && patch_size <= kIntMax &&
                  stride <= kIntMax && padding <= kIntMax && scale <= kIntMax,
              op, ": need patch_size, stride, scale >= 1 and padding >= 0; got ", patch_size, ", ", stride,
              ", ", padding, ", ", scale);
}

void check_index(const char* op, const at::Tensor& index, const at::Device& device, int64_t B) {
  TORCH_CHECK(index.device() == device, op, ": index is on ", index.device(), ", expected ", device);
  TORCH_CHECK(index.dim() == 3 && index.scalar_type() == at::kLong && index.size(0) == B &&
                  index.size(1) >= 1 && index.size(2) >= 1 && index.size(1) * index.size(2) < kIntMax,
              op, ": index must be int64 (", B, ", Gq_h, Gq_w), got ", index.scalar_type(), " ", index.sizes());
}

// Value map sizes -> {Hv, Wv, ...} as int, checking that each gives a key grid of at least 1x1.
std::vector<int> value_hw_of(const char* op, const std::vector<int64_t>& sizes, int64_t patch_size,
                             int64_t padding, int64_t scale) {
  TORCH_CHECK(!sizes.empty() && sizes.size() % 2 == 0, op, ": bad value sizes");
  std::vector<int> hw;
  hw.reserve(sizes.size());
  for (int64_t i = 0; i < static_cast<int64_t>(sizes.size()); ++i) {
    TORCH_CHECK(sizes[i] >= 0 && sizes[i] <= kIntMax, op, ": bad value size ", sizes[i]);
    TORCH_CHECK(sizes[i] / scale + 2 * padding >= patch_size, op, ": values[", i / 2, "] of size ",
                sizes[i - i % 2], "x", sizes[i - i % 2 + 1], " gives a key map smaller than one patch");
    hw.push_back(static_cast<int>(sizes[i]));
  }
  return hw;
}

at::Tensor feature_swap_fused_cuda(at::TensorList values_in, const at::Tensor& index_in, int64_t patch_size,
                                   int64_t stride, int64_t padding, int64_t scale, int64_t out_h, int64_t out_w,
                                   c10::string_view reduce) {
  constexpr const char* op = "_feature_swap_fused (CUDA)";
  check_patch(op, patch_size, stride, padding);
  check_bound(op, "scale", scale, 1, kScaleMax);
  check_bound(op, "out_h", out_h, 0, kSideMax);
  check_bound(op, "out_w", out_w, 0, kSideMax);
  TORCH_CHECK(!values_in.empty(), op, ": values must not be empty");
  const at::Tensor& v0 = values_in[0];
  TORCH_CHECK(v0.is_cuda(), op, ": values must be CUDA tensors");
  if (is_reduced_float(v0)) {
    std::vector<at::Tensor> wide;
    for (const at::Tensor& v : values_in) wide.push_back(v.to(at::kFloat));
    return feature_swap_fused_cuda(wide, index_in, patch_size, stride, padding, scale, out_h, out_w, reduce)
        .to(v0.scalar_type());
  }
  TORCH_CHECK(v0.scalar_type() == at::kFloat || v0.scalar_type() == at::kDouble, op,
              ": values must be float16, bfloat16, float32 or float64, got ", v0.scalar_type());
  TORCH_CHECK(v0.dim() == 4, op, ": values[0] must be (B, C, H, W), got ", v0.sizes());
  check_params(op, patch_size, stride, padding, scale);
  TORCH_CHECK(out_h >= 0 && out_w >= 0 && out_h <= kIntMax && out_w <= kIntMax, op, ": bad output size ",
              out_h, "x", out_w);
  const bool mean = parse_reduce(reduce, op);

  c10::cuda::CUDAGuard device_guard(v0.device());
  const int64_t B = v0.size(0), Cv = v0.size(1);
  TORCH_CHECK(B >= 1 && Cv >= 1 && B <= kIntMax && Cv <= kIntMax, op, ": bad values shape ", v0.sizes());
  check_index(op, index_in, v0.device(), B);
  std::vector<at::Tensor> values;
  std::vector<int64_t> sizes;
  for (int64_t i = 0; i < static_cast<int64_t>(values_in.size()); ++i) {
    const at::Tensor& v = values_in[i];
    TORCH_CHECK(v.device() == v0.device() && v.scalar_type() == v0.scalar_type(), op, ": values[", i,
                "] must be on ", v0.device(), " with dtype ", v0.scalar_type());
    TORCH_CHECK(v.dim() == 4 && v.size(0) == B && v.size(1) == Cv, op, ": values[", i, "] must be (", B,
                ", ", Cv, ", H, W), got ", v.sizes());
    values.push_back(v.contiguous());
    sizes.push_back(v.size(2));
    sizes.push_back(v.size(3));
  }
  const std::vector<int> value_hw = value_hw_of(op, sizes, patch_size, padding, scale);
  const at::Tensor index = index_in.contiguous();

  at::Tensor out = at::empty({B, Cv, out_h, out_w}, v0.options());
  if (out.numel() == 0) return out;
  const cuda_kernels::SwapGeom g{static_cast<int>(B), static_cast<int>(Cv), static_cast<int>(out_h),
                                 static_cast<int>(out_w), static_cast<int>(index.size(1)),
                                 static_cast<int>(index.size(2)), static_cast<int>(patch_size),
                                 static_cast<int>(stride), static_cast<int>(padding), static_cast<int>(scale),
                                 mean};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "_feature_swap_fused_cuda", [&] {
    std::vector<const scalar_t*> ptrs;
    ptrs.reserve(values.size());
    for (const at::Tensor& v : values) ptrs.push_back(v.data_ptr<scalar_t>());
    C10_CUDA_CHECK(cuda_kernels::feature_swap_forward<scalar_t>(ptrs.data(), value_hw.data(),
                                                                static_cast<int>(values.size()),
                                                                index.data_ptr<int64_t>(),
                                                                out.data_ptr<scalar_t>(), g, stream));
  });
  return out;
}

std::vector<at::Tensor> feature_swap_fused_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& index_in,
                                                         at::IntArrayRef value_sizes, int64_t patch_size,
                                                         int64_t stride, int64_t padding, int64_t scale,
                                                         c10::string_view reduce) {
  constexpr const char* op = "_feature_swap_fused_backward (CUDA)";
  check_patch(op, patch_size, stride, padding);
  check_bound(op, "scale", scale, 1, kScaleMax);
  TORCH_CHECK(grad_out_in.is_cuda(), op, ": grad_out must be a CUDA tensor");
  TORCH_CHECK(grad_out_in.dim() == 4, op, ": grad_out must be (B, C, H, W), got ", grad_out_in.sizes());
  if (is_reduced_float(grad_out_in)) {
    std::vector<at::Tensor> grads = feature_swap_fused_backward_cuda(
        grad_out_in.to(at::kFloat), index_in, value_sizes, patch_size, stride, padding, scale, reduce);
    for (at::Tensor& g : grads) g = g.to(grad_out_in.scalar_type());
    return grads;
  }
  TORCH_CHECK(grad_out_in.scalar_type() == at::kFloat || grad_out_in.scalar_type() == at::kDouble, op,
              ": grad_out must be float16, bfloat16, float32 or float64, got ", grad_out_in.scalar_type());
  check_params(op, patch_size, stride, padding, scale);
  const bool mean = parse_reduce(reduce, op);

  c10::cuda::CUDAGuard device_guard(grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const int64_t B = grad_out.size(0), Cv = grad_out.size(1);
  TORCH_CHECK(B >= 1 && Cv >= 1 && B <= kIntMax && Cv <= kIntMax && grad_out.size(2) <= kIntMax &&
                  grad_out.size(3) <= kIntMax,
              op, ": bad grad_out shape ", grad_out.sizes());
  check_index(op, index_in, grad_out.device(), B);
  const std::vector<int> value_hw =
      value_hw_of(op, value_sizes.vec(), patch_size, padding, scale);
  const int num_refs = static_cast<int>(value_hw.size() / 2);
  const at::Tensor index = index_in.contiguous();

  std::vector<at::Tensor> grads;
  grads.reserve(num_refs);
  for (int r = 0; r < num_refs; ++r)
    grads.push_back(at::empty({B, Cv, value_hw[2 * r], value_hw[2 * r + 1]}, grad_out.options()));
  const cuda_kernels::SwapGeom g{static_cast<int>(B), static_cast<int>(Cv), static_cast<int>(grad_out.size(2)),
                                 static_cast<int>(grad_out.size(3)), static_cast<int>(index.size(1)),
                                 static_cast<int>(index.size(2)), static_cast<int>(patch_size),
                                 static_cast<int>(stride), static_cast<int>(padding), static_cast<int>(scale),
                                 mean};
  const cuda_kernels::SwapBackwardPlan plan = cuda_kernels::plan_feature_swap_backward(
      value_hw.data(), num_refs, g, static_cast<int>(grad_out.element_size()));
  TORCH_CHECK(plan.ok, op, ": sizes out of the kernel's range (batch x cells must be < 2^31)");
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(plan.workspace_bytes)}, grad_out.options().dtype(at::kByte));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "_feature_swap_fused_backward_cuda", [&] {
    std::vector<scalar_t*> ptrs;
    ptrs.reserve(grads.size());
    for (at::Tensor& t : grads) ptrs.push_back(t.data_ptr<scalar_t>());
    C10_CUDA_CHECK(cuda_kernels::feature_swap_backward<scalar_t>(
        grad_out.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), value_hw.data(), num_refs, ptrs.data(), g,
        workspace.data_ptr(), plan.workspace_bytes, stream));
  });
  return grads;
}

}  // namespace
}  // namespace srntt

TORCH_LIBRARY_IMPL(srntt, CUDA, m) {
  m.impl("_feature_swap_fused", TORCH_FN(srntt::feature_swap_fused_cuda));
  m.impl("_feature_swap_fused_backward", TORCH_FN(srntt::feature_swap_fused_backward_cuda));
}
