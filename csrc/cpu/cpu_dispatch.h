// Runtime CPU dispatch for the hot loops of the CPU kernels.
//
// The default build targets the x86-64 baseline the compiler assumes (SSE2..SSE4.2 at most), so
// one binary runs on any x86-64 CPU. The hot loops are compiled two more times, for AVX2 + FMA
// and for AVX-512, and the best variant the CPU supports is chosen at run time:
//
//   at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
//     cpu_dispatch([&] { ...hot loop over [begin, end)... });
//   });
//
// cpu_dispatch calls one of three instantiations of a `flatten` function template: `flatten`
// inlines the lambda and everything it calls into the instantiation, and the `target` attribute
// of that instantiation decides which instructions the inlined code may use. Nothing outside a
// variant is compiled for AVX, so functions shared with the rest of the library (COMDAT inline
// functions of std:: or ATen) never carry AVX instructions onto a CPU without them.
//
// NB: the portable build gets its fused multiply-adds from contraction (-ffp-contract=fast, set
// in setup.py): `a * b + c` is one FMA in the AVX2 / AVX-512 variants and a multiply then an add
// in the default one. One process always runs one variant, so equal inputs still give bit-equal
// results there (ties go to the smallest index); results of different variants may differ in
// the last bits, within the precision contract (docs/CONTRACT.md, "Precision").
//
// SRNTT_CPU_CAPABILITY=default|avx2|avx512 lowers the variant (never above what the CPU has),
// e.g. to test the baseline code on a newer CPU. A build with SRNTT_NATIVE=1 (-march=native)
// compiles the hot loops once, for the build machine, and reports "native".
#pragma once

#include <cstdint>
#include <type_traits>

namespace srntt {

enum class CpuCapability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kNative = 3 };

// The variant this process runs (detected once; SRNTT_CPU_CAPABILITY may lower it).
CpuCapability cpu_capability();
const char* cpu_capability_name(CpuCapability capability);

#if defined(__GNUC__) || defined(__clang__)
#define SRNTT_FLATTEN __attribute__((flatten))
#else
#define SRNTT_FLATTEN
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SRNTT_NATIVE_BUILD)
#define SRNTT_CPU_DISPATCH 1

template <typename Fn>
__attribute__((target("avx2,fma"))) SRNTT_FLATTEN void run_avx2(const Fn& fn) {
  fn();
}

template <typename Fn>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))) SRNTT_FLATTEN void
run_avx512(const Fn& fn) {
  fn();
}
#endif

template <typename Fn>
SRNTT_FLATTEN void run_default(const Fn& fn) {
  fn();
}

// Runs fn(avx) compiled for the best instruction set this CPU supports, where avx is
// std::true_type in the AVX2 / AVX-512 variants and std::false_type in the baseline one: code that
// needs an AVX intrinsic (e.g. a broadcast from memory) branches on it at compile time.
template <typename Fn>
inline void cpu_dispatch_avx(const Fn& fn) {
#ifdef SRNTT_CPU_DISPATCH
  switch (cpu_capability()) {
    case CpuCapability::kAvx512:
      run_avx512([&] { fn(std::true_type{}); });
      return;
    case CpuCapability::kAvx2:
      run_avx2([&] { fn(std::true_type{}); });
      return;
    default:
      break;
  }
#endif
  run_default([&] { fn(std::false_type{}); });
}

// Runs fn() compiled for the best instruction set this CPU supports.
template <typename Fn>
inline void cpu_dispatch(const Fn& fn) {
  cpu_dispatch_avx([&](auto) { fn(); });
}

}  // namespace srntt
