#include "cpu/patch_match_overlap_cpu.h"

namespace srntt {
void patch_match_overlap(const float*, int64_t, int64_t, int64_t, int64_t,
                         const std::vector<OverlapKey>&, int64_t, int64_t, const double*,
                         int64_t*, float*) {}
}  // namespace srntt
