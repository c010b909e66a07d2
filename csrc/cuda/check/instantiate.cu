// Compile check of every kernel header under csrc/cuda (scripts/cuda_check.sh), without torch:
// explicitly instantiates every kernel template and host launcher for float and double.
#include "../common.cuh"
#include "../feature_swap.cuh"
#include "../patch_match.cuh"

namespace srntt {
namespace cuda_kernels {

template cudaError_t patch_match<float>(const PatchMatchArgs<float>&, void*, size_t, cudaStream_t);
template cudaError_t patch_match<double>(const PatchMatchArgs<double>&, void*, size_t, cudaStream_t);
template size_t patch_match_workspace_bytes<float>(const PatchMatchArgs<float>&);
template size_t patch_match_workspace_bytes<double>(const PatchMatchArgs<double>&);
template __global__ void match_exact_kernel<float>(const float*, const float*, const int2*, const float*,
                                                   const float*, MatchGeom, int64_t, int, int64_t, float*,
                                                   int64_t*);
template __global__ void match_exact_kernel<double>(const double*, const double*, const int2*,
                                                    const double*, const double*, MatchGeom, int64_t, int,
                                                    int64_t, double*, int64_t*);
// match_tc_kernel (every precision and pass), rescore_candidates_kernel and select_candidates_kernel
// are instantiated through patch_match<float>.

template cudaError_t feature_swap_forward<float>(const float* const*, const int*, int, const int64_t*, float*,
                                                 const SwapGeom&, cudaStream_t);
template cudaError_t feature_swap_forward<double>(const double* const*, const int*, int, const int64_t*,
                                                  double*, const SwapGeom&, cudaStream_t);
template cudaError_t feature_swap_backward<float>(const float*, const int64_t*, const int*, int, float* const*,
                                                  const SwapGeom&, void*, size_t, cudaStream_t);
template cudaError_t feature_swap_backward<double>(const double*, const int64_t*, const int*, int,
                                                   double* const*, const SwapGeom&, void*, size_t,
                                                   cudaStream_t);

}  // namespace cuda_kernels
}  // namespace srntt
