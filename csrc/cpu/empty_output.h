// Uninitialized outputs of the CPU kernels that overwrite them completely, backed by transparent
// huge pages where the OS allows it.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace srntt {

#ifdef __linux__
// Large outputs: ask for transparent huge pages before the first touch. Faulting in a fresh output
// 4 KiB page by page can cost more than the kernel itself (one fault and one zeroed page per 4 KiB;
// a 2 MiB page takes one fault for 512 of them). Only the 2 MiB-aligned interior of the buffer is
// advised; where THP is off or madvise fails, the default pages stay.
inline void advise_huge_pages(void* ptr, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
}
#else
inline void advise_huge_pages(void*, size_t) {}
#endif

// An uninitialized output that the kernel overwrites completely.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

}  // namespace srntt
