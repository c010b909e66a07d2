// Checks of the integer arguments of the kernel-level ops (srntt::_*_fused) against the bounds of
// srntt_geometry.h, and overflow-checked size arithmetic, at the entry of every kernel
// (docs/DESIGN.md, "Bounds and bad input"). Python checks the same bounds first, with the argument
// names users know; this is the second line of defence for direct calls of the ops. Within them no size a kernel computes
// overflows int64; the checked products below catch tensors whose own sizes would.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <cstdint>
#include <initializer_list>

#include "srntt_geometry.h"

namespace srntt {

inline void check_bound(const char* op, const char* name, int64_t value, int64_t lo, int64_t hi) {
  TORCH_CHECK_VALUE(value >= lo && value <= hi, op, ": ", name, " must be in [", lo, ", ", hi,
                    "], got ", value);
}

inline void check_patch(const char* op, int64_t patch_size, int64_t stride, int64_t padding) {
  check_bound(op, "patch_size", patch_size, 1, kPatchSizeMax);
  check_bound(op, "stride", stride, 1, kStrideMax);
  check_bound(op, "padding", padding, 0, kPaddingMax);
}

// The product of `dims` (all >= 0), overflow-checked, at most `limit`.
inline int64_t checked_product(const char* op, const char* what, std::initializer_list<int64_t> dims,
                               int64_t limit) {
  int64_t n = 1;
  for (const int64_t d : dims) {
    TORCH_CHECK_VALUE(d >= 0, op, ": ", what, " has a negative size ", d);
    TORCH_CHECK_VALUE(!c10::mul_overflows(n, d, &n), op, ": ", what, " overflows int64");
  }
  TORCH_CHECK_VALUE(n <= limit, op, ": ", what, " would need ", n, " elements, more than the limit ",
                    limit);
  return n;
}

// Elements of a tensor the op allocates.
inline int64_t checked_numel(const char* op, const char* what, std::initializer_list<int64_t> dims) {
  return checked_product(op, what, dims, kElementsMax);
}

// Patch-grid size along a side of `size` pixels (after the bounds of check_patch); >= 1.
inline int64_t checked_grid(const char* op, const char* what, int64_t size, int64_t patch_size,
                            int64_t stride, int64_t padding) {
  int64_t padded = 0;
  TORCH_CHECK_VALUE(size >= 0 && !c10::add_overflows(size, 2 * padding, &padded), op, ": ", what,
                    " size ", size, " overflows with padding");
  TORCH_CHECK_VALUE(padded >= patch_size, op, ": ", what, " is smaller than one patch");
  return grid_size(size, patch_size, stride, padding);
}

}  // namespace srntt
