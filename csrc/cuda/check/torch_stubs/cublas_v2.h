#pragma once
// Stub for scripts/cuda_check.sh --bindings only: a CPU build of torch ships ATen/cuda headers
// but not these; the binding files use nothing from them. Never used in a real build.
#include <cuda_runtime.h>
typedef struct cublasContext* cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;
