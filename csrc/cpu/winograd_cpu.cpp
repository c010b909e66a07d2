// CPU binding of srntt::_winograd_pack and srntt::_winograd_conv3x3 (the kernel: winograd_cpu.h):
// argument checks, allocation, threads, CPU variant.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "cpu/cpu_dispatch.h"
#include "cpu/empty_output.h"
#include "cpu/winograd_cpu.h"
#include "srntt_limits.h"

namespace srntt {
namespace {

void check_float_cpu(const char* op, const char* name, const at::Tensor& t, int64_t dims) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == dims, op, ": ", name, " must have ", dims, " dimensions, got ",
                    t.dim());
}

void check_channels(const char* op, const char* name, int64_t channels) {
  check_bound(op, name, channels, winograd::kChannelAlign, kConvChannelsMax);
  TORCH_CHECK_VALUE(channels % winograd::kChannelAlign == 0, op, ": ", name,
                    " must be a multiple of ", winograd::kChannelAlign, ", got ", channels);
}

// The calling thread's workspace of at least `floats` floats. It lives as long as the thread and
// only grows: a fresh one per call would fault in its pages again each time (hundreds of KiB).
float* thread_workspace(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

at::Tensor winograd_pack_cpu(const at::Tensor& weight) {
  constexpr const char* kOp = "_winograd_pack";
  check_float_cpu(kOp, "weight", weight, 4);
  TORCH_CHECK_VALUE(weight.size(2) == 3 && weight.size(3) == 3, kOp,
                    ": weight must be (Cout, Cin, 3, 3), got ", weight.sizes());
  const int64_t cout = weight.size(0), cin = weight.size(1);
  check_channels(kOp, "weight's Cout", cout);
  check_channels(kOp, "weight's Cin", cin);
  checked_numel(kOp, "packed", {winograd::kPoints, cin, cout});
  const at::Tensor w = weight.contiguous();
  at::Tensor packed = at::empty({winograd::kPoints, cin, cout}, weight.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, cout, 8, [&](int64_t begin, int64_t end) {
    winograd::pack_filters(src, cout, cin, dst, begin, end);
  });
  return packed;
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& packed,
                                const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& other, bool relu) {
  constexpr const char* kOp = "_winograd_conv3x3";
  check_float_cpu(kOp, "x", x, 4);
  check_float_cpu(kOp, "packed", packed, 3);
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK_VALUE(x.is_contiguous(at::MemoryFormat::ChannelsLast), kOp,
                    ": x must be channels_last contiguous (NHWC memory)");
  check_channels(kOp, "x's channels", cin);
  check_bound(kOp, "x's height", h, 1, kSideMax);
  check_bound(kOp, "x's width", w, 1, kSideMax);
  TORCH_CHECK_VALUE(packed.is_contiguous() && packed.size(0) == winograd::kPoints &&
                        packed.size(1) == cin,
                    kOp, ": packed must be a contiguous (36, ", cin,
                    ", Cout) tensor from _winograd_pack for x's ", cin, " channels, got ",
                    packed.sizes());
  const int64_t cout = packed.size(2);
  check_channels(kOp, "packed's Cout", cout);
  if (bias.has_value()) {
    check_float_cpu(kOp, "bias", *bias, 1);
    TORCH_CHECK_VALUE(bias->size(0) == cout && bias->is_contiguous(), kOp,
                      ": bias must be a contiguous (", cout, ") tensor, got ", bias->sizes());
  }
  if (other.has_value()) {
    check_float_cpu(kOp, "other", *other, 4);
    TORCH_CHECK_VALUE(other->sizes() == at::IntArrayRef({n, cout, h, w}), kOp, ": other must be (",
                      n, ", ", cout, ", ", h, ", ", w, "), got ", other->sizes());
    TORCH_CHECK_VALUE(other->is_contiguous(at::MemoryFormat::ChannelsLast), kOp,
                      ": other must be channels_last contiguous (NHWC memory)");
  }
  checked_numel(kOp, "the output", {n, cout, h, w});
  at::Tensor y =
      empty_output({n, cout, h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (n == 0) return y;

  winograd::Conv cv{x.data_ptr<float>(),
                    packed.data_ptr<float>(),
                    bias.has_value() ? bias->data_ptr<float>() : nullptr,
                    other.has_value() ? other->data_ptr<float>() : nullptr,
                    y.data_ptr<float>(),
                    n, h, w, cin, cout, relu};
  const int64_t block = winograd::block_tiles(cin, cout);
  const int64_t blocks = (cv.tiles() + block - 1) / block;
  const int64_t work = winograd::workspace_floats(cin, cout);
  // NB: the threads take chunks of blocks from a shared counter rather than one fixed range each:
  // on a shared machine a thread that loses its core for a while then delays only its current
  // chunk, not the whole call. Each tile's result does not depend on which thread computes it.
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(1, blocks / (8 * threads));
  const int64_t chunks = (blocks + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, chunks), 1, [&](int64_t, int64_t) {
    float* buffer = thread_workspace(work);
    for (int64_t c = next++; c < chunks; c = next++) {
      const int64_t first = c * chunk * block, last = std::min((c + 1) * chunk * block, cv.tiles());
      cpu_dispatch_avx([&](auto avx2) {
        winograd::winograd_tiles<decltype(avx2)::value>(cv, first, last, buffer);
      });
    }
  });
  return y;
}

}  // namespace
}  // namespace srntt

TORCH_LIBRARY_IMPL(srntt, CPU, m) {
  m.impl("_winograd_pack", &srntt::winograd_pack_cpu);
  m.impl("_winograd_conv3x3", &srntt::winograd_conv3x3_cpu);
}
