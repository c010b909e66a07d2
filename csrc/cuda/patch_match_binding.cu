// CUDA kernel of srntt::_patch_match_fused (semantics: docs/DESIGN.md, "patch_match semantics").
// This file only checks arguments, sets the device, takes the current stream, dispatches the dtype
// and allocates the workspace; the kernels are torch-free, in patch_match.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/patch_match.cuh"
#include "srntt_limits.h"

namespace srntt {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

cuda_kernels::MatchPrecision parse_precision(c10::string_view precision) {
  TORCH_CHECK(precision == "highest" || precision == "high" || precision == "medium",
              "_patch_match_fused: precision must be 'highest', 'high' or 'medium', got '",
              std::string(precision.data(), precision.size()), "'");
  if (precision == "high") return cuda_kernels::MatchPrecision::kHigh;
  if (precision == "medium") return cuda_kernels::MatchPrecision::kMedium;
  return cuda_kernels::MatchPrecision::kHighest;
}

void check_map(const at::Tensor& x, const char* name, int64_t patch_size, int64_t padding) {
  TORCH_CHECK(x.size(2) + 2 * padding >= patch_size && x.size(3) + 2 * padding >= patch_size,
              "_patch_match_fused: ", name, " of size ", x.size(2), "x", x.size(3),
              " is smaller than one patch (patch_size ", patch_size, ", padding ", padding, ")");
  TORCH_CHECK(x.size(2) <= kIntMax && x.size(3) <= kIntMax, "_patch_match_fused: ", name, " is too large");
}

std::tuple<at::Tensor, at::Tensor> patch_match_fused_cuda(const at::Tensor& query_in, at::TensorList keys_in,
                                                          int64_t patch_size, int64_t stride, int64_t padding,
                                                          c10::string_view precision) {
  check_patch("_patch_match_fused (CUDA)", patch_size, stride, padding);
  TORCH_CHECK(query_in.is_cuda(), "_patch_match_fused (CUDA): query must be a CUDA tensor");
  TORCH_CHECK(query_in.dim() == 4, "_patch_match_fused: query must be (B, C, H, W), got ", query_in.sizes());
  TORCH_CHECK(query_in.scalar_type() == at::kFloat || query_in.scalar_type() == at::kDouble,
              "_patch_match_fused: query must be float32 or float64, got ", query_in.scalar_type());
  TORCH_CHECK(!keys_in.empty(), "_patch_match_fused: keys must not be empty");
  TORCH_CHECK(patch_size >= 1 && patch_size < (1 << 15) && stride >= 1 && padding >= 0 &&
                  stride <= kIntMax && padding <= kIntMax,
              "_patch_match_fused: need 1 <= patch_size < 32768, stride >= 1, padding >= 0; got ",
              patch_size, ", ", stride, ", ", padding);
  const cuda_kernels::MatchPrecision prec = parse_precision(precision);

  c10::cuda::CUDAGuard device_guard(query_in.device());
  const at::Tensor query = query_in.contiguous();
  const int64_t B = query.size(0), C = query.size(1);
  TORCH_CHECK(B >= 1 && B <= 65535 && C >= 1 && C <= kIntMax,
              "_patch_match_fused: need 1 <= batch <= 65535 and channels >= 1; got ", query.sizes());
  TORCH_CHECK(C * patch_size * patch_size < kIntMax, "_patch_match_fused: descriptor too long");
  check_map(query, "query", patch_size, padding);

  std::vector<at::Tensor> keys;
  std::vector<int> key_hw;
  keys.reserve(keys_in.size());
  key_hw.reserve(2 * keys_in.size());
  for (int64_t i = 0; i < static_cast<int64_t>(keys_in.size()); ++i) {
    const at::Tensor& k = keys_in[i];
    TORCH_CHECK(k.device() == query.device(), "_patch_match_fused: keys[", i, "] is on ", k.device(),
                ", query on ", query.device());
    TORCH_CHECK(k.scalar_type() == query.scalar_type(), "_patch_match_fused: keys[", i, "] has dtype ",
                k.scalar_type(), ", query ", query.scalar_type());
    TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == C, "_patch_match_fused: keys[", i,
                "] must be (", B, ", ", C, ", H, W), got ", k.sizes());
    check_map(k, "a key", patch_size, padding);
    keys.push_back(k.contiguous());
    key_hw.push_back(static_cast<int>(k.size(2)));
    key_hw.push_back(static_cast<int>(k.size(3)));
  }

  const int64_t gqh = grid_size(query.size(2), patch_size, stride, padding);
  const int64_t gqw = grid_size(query.size(3), patch_size, stride, padding);
  at::Tensor index = at::empty({B, gqh, gqw}, query.options().dtype(at::kLong));
  at::Tensor score = at::empty({B, gqh, gqw}, query.options());
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "_patch_match_fused_cuda", [&] {
    std::vector<const scalar_t*> key_ptrs;
    key_ptrs.reserve(keys.size());
    for (const at::Tensor& k : keys) key_ptrs.push_back(k.data_ptr<scalar_t>());
    cuda_kernels::PatchMatchArgs<scalar_t> args;
    args.query = query.data_ptr<scalar_t>();
    args.B = static_cast<int>(B);
    args.C = static_cast<int>(C);
    args.Hq = static_cast<int>(query.size(2));
    args.Wq = static_cast<int>(query.size(3));
    args.num_keys = static_cast<int>(keys.size());
    args.keys = key_ptrs.data();
    args.key_hw = key_hw.data();
    args.patch_size = static_cast<int>(patch_size);
    args.stride = static_cast<int>(stride);
    args.padding = static_cast<int>(padding);
    args.precision = prec;
    args.num_sms = props->multiProcessorCount;
    args.compute_capability = props->major * 10 + props->minor;
    args.index = index.data_ptr<int64_t>();
    args.score = score.data_ptr<scalar_t>();
    const cuda_kernels::PatchMatchPlan plan = cuda_kernels::plan_patch_match(args);
    TORCH_CHECK(plan.ok, "_patch_match_fused (CUDA): sizes out of the kernel's range (patch grids must "
                "hold fewer than 2^31 patches per map)");
    at::Tensor workspace =
        at::empty({static_cast<int64_t>(plan.workspace_bytes)}, query.options().dtype(at::kByte));
    C10_CUDA_CHECK(cuda_kernels::patch_match(args, workspace.data_ptr(), plan.workspace_bytes, stream));
  });
  return std::make_tuple(index, score);
}

// Architecture of the kernel image this extension runs on `device` (e.g. 90), or 0 when it has
// none for the device's compute capability (neither a cubin nor PTX it can JIT-compile), so that
// backend selection falls back instead of failing with "no kernel image".
int64_t cuda_kernel_image(int64_t device) {
  TORCH_CHECK(device >= 0 && device < 1024, "_cuda_kernel_image: bad device index ", device);
  c10::cuda::CUDAGuard device_guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, cuda_kernels::init_state_kernel<float>) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it
    return 0;
  }
  return attr.binaryVersion;
}

}  // namespace
}  // namespace srntt

TORCH_LIBRARY_FRAGMENT(srntt, m) {
  m.def("_cuda_kernel_image(int device) -> int", &srntt::cuda_kernel_image);
}

TORCH_LIBRARY_IMPL(srntt, CUDA, m) {
  m.impl("_patch_match_fused", TORCH_FN(srntt::patch_match_fused_cuda));
}
