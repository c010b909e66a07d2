#pragma once
// Stub for scripts/cuda_check.sh --bindings only: a CPU build of torch ships ATen/cuda headers
// but not these; the binding files use nothing from them. Never used in a real build.
typedef struct cusolverDnContext* cusolverDnHandle_t;
#include "cusolver_common.h"
