#pragma once
// Stub for scripts/cuda_check.sh --bindings only: a CPU build of torch ships ATen/cuda headers
// but not these; the binding files use nothing from them. Never used in a real build.
typedef struct cusparseContext* cusparseHandle_t;
typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;
inline const char* cusparseGetErrorString(cusparseStatus_t) { return ""; }
