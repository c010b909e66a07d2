// Which variant of the hot loops this process runs (see cpu_dispatch.h), and the op
// srntt::_cpu_capability() that reports it to Python (srntt_core.build_info()).
#include "cpu/cpu_dispatch.h"

#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace srntt {
namespace {

CpuCapability detect() {
#if defined(SRNTT_NATIVE_BUILD)
  return CpuCapability::kNative;
#elif defined(SRNTT_CPU_DISPATCH)
  // NB: libgcc's checks include the OS's support for the wider registers (XCR0), not only
  // the CPUID bits.
  __builtin_cpu_init();
  CpuCapability best = CpuCapability::kDefault;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    best = CpuCapability::kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      best = CpuCapability::kAvx512;
    }
  }
  const char* env = std::getenv("SRNTT_CPU_CAPABILITY");
  CpuCapability asked = best;
  if (env != nullptr && std::strcmp(env, "default") == 0) asked = CpuCapability::kDefault;
  if (env != nullptr && std::strcmp(env, "avx2") == 0) asked = CpuCapability::kAvx2;
  return static_cast<int>(asked) < static_cast<int>(best) ? asked : best;
#else
  return CpuCapability::kDefault;
#endif
}

std::string cpu_capability_op() { return cpu_capability_name(cpu_capability()); }

}  // namespace

CpuCapability cpu_capability() {
  static const CpuCapability capability = detect();
  return capability;
}

const char* cpu_capability_name(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::kAvx2:
      return "avx2";
    case CpuCapability::kAvx512:
      return "avx512";
    case CpuCapability::kNative:
      return "native";
    default:
      return "default";
  }
}

}  // namespace srntt

TORCH_LIBRARY_FRAGMENT(srntt, m) {
  m.def("_cpu_capability() -> str", &srntt::cpu_capability_op);
}
