// Host-side checks of the CUDA kernels' index math, runnable without a GPU (scripts/cuda_check.sh
// builds and runs it). The __host__ __device__ per-element bodies of feature_swap.cuh and the
// helpers of patch_match.cuh are run on the CPU against brute-force versions written the obvious
// way (scatter every window; unfold every patch). Also checks the tensor-core candidate margin
// of patch_match.cuh on emulated TF32/BF16 rounding. Prints one line per check; exit code 1 on
// any failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../feature_swap.cuh"
#include "../patch_match.cuh"

using namespace srntt::cuda_kernels;
using srntt::grid_size;

namespace {

int failures = 0;

void expect(bool ok, const char* what, const char* detail = "") {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s %s\n", what, detail);
  }
}

struct SwapCase {
  int B, Cv, p, s, pad, scale, gqh, gqw, out_h, out_w;
  bool mean;
  std::vector<int> hw;  // Hv, Wv per reference
};

// Brute force: scatter every window (docs/CONTRACT.md §3), counting covers regardless of reads.
void swap_reference(const SwapCase& sc, const std::vector<std::vector<double>>& values,
                    const std::vector<int64_t>& index, std::vector<double>& out) {
  const int P = sc.p * sc.scale;
  const int R = static_cast<int>(sc.hw.size()) / 2;
  std::vector<int64_t> off(R + 1, 0);
  std::vector<int> gkw(R);
  for (int r = 0; r < R; ++r) {
    int gh, gw;
    swap_key_grid(sc.hw[2 * r], sc.hw[2 * r + 1], sc.p, sc.s, sc.pad, sc.scale, &gh, &gw);
    gkw[r] = gw;
    off[r + 1] = off[r] + static_cast<int64_t>(gh) * gw;
  }
  out.assign(static_cast<size_t>(sc.B) * sc.Cv * sc.out_h * sc.out_w, 0.0);
  std::vector<int> cnt(static_cast<size_t>(sc.out_h) * sc.out_w, 0);
  for (int i = 0; i < sc.gqh; ++i)
    for (int j = 0; j < sc.gqw; ++j)
      for (int a = 0; a < P; ++a)
        for (int c = 0; c < P; ++c) {
          const int oy = (i * sc.s - sc.pad) * sc.scale + a, ox = (j * sc.s - sc.pad) * sc.scale + c;
          if (oy >= 0 && oy < sc.out_h && ox >= 0 && ox < sc.out_w) ++cnt[oy * sc.out_w + ox];
        }
  for (int b = 0; b < sc.B; ++b)
    for (int i = 0; i < sc.gqh; ++i)
      for (int j = 0; j < sc.gqw; ++j) {
        const int64_t k = index[(static_cast<size_t>(b) * sc.gqh + i) * sc.gqw + j];
        int r = 0;
        while (!(k >= off[r] && k < off[r + 1])) ++r;
        const int u = static_cast<int>((k - off[r]) / gkw[r]), v = static_cast<int>((k - off[r]) % gkw[r]);
        const int hv = sc.hw[2 * r], wv = sc.hw[2 * r + 1];
        for (int a = 0; a < P; ++a)
          for (int c2 = 0; c2 < P; ++c2) {
            const int oy = (i * sc.s - sc.pad) * sc.scale + a, ox = (j * sc.s - sc.pad) * sc.scale + c2;
            const int vy = (u * sc.s - sc.pad) * sc.scale + a, vx = (v * sc.s - sc.pad) * sc.scale + c2;
            if (oy < 0 || oy >= sc.out_h || ox < 0 || ox >= sc.out_w) continue;
            if (vy < 0 || vy >= hv || vx < 0 || vx >= wv) continue;
            for (int ch = 0; ch < sc.Cv; ++ch)
              out[((static_cast<size_t>(b) * sc.Cv + ch) * sc.out_h + oy) * sc.out_w + ox] +=
                  values[r][((static_cast<size_t>(b) * sc.Cv + ch) * hv + vy) * wv + vx];
          }
      }
  if (sc.mean)
    for (size_t t = 0; t < out.size(); ++t) {
      const int n = cnt[t % (static_cast<size_t>(sc.out_h) * sc.out_w)];
      out[t] = n > 0 ? out[t] / n : 0.0;
    }
}

void check_swap_case(const SwapCase& sc, std::mt19937& rng) {
  std::uniform_real_distribution<double> U(-1.0, 1.0);
  const int R = static_cast<int>(sc.hw.size()) / 2;
  std::vector<std::vector<double>> values(R);
  std::vector<const double*> ptrs(R);
  int64_t nk_total = 0;
  for (int r = 0; r < R; ++r) {
    values[r].resize(static_cast<size_t>(sc.B) * sc.Cv * sc.hw[2 * r] * sc.hw[2 * r + 1]);
    for (auto& x : values[r]) x = U(rng);
    ptrs[r] = values[r].data();
    int gh, gw;
    swap_key_grid(sc.hw[2 * r], sc.hw[2 * r + 1], sc.p, sc.s, sc.pad, sc.scale, &gh, &gw);
    nk_total += static_cast<int64_t>(gh) * gw;
  }
  std::uniform_int_distribution<int64_t> K(0, nk_total - 1);
  std::vector<int64_t> index(static_cast<size_t>(sc.B) * sc.gqh * sc.gqw);
  for (auto& k : index) k = K(rng);
  if (index.size() > 3) index[1] = index[0];  // shared matches: buckets with several cells

  SwapGeom g{sc.B, sc.Cv, sc.out_h, sc.out_w, sc.gqh, sc.gqw, sc.p, sc.s, sc.pad, sc.scale, sc.mean};

  // Forward, the way the launcher and kernel do it (chunks of kSwapRefsPerLaunch references).
  std::vector<double> expected, out(static_cast<size_t>(sc.B) * sc.Cv * sc.out_h * sc.out_w, 0.0);
  swap_reference(sc, values, index, expected);
  int64_t offset = 0;
  for (int r0 = 0; r0 < R; r0 += kSwapRefsPerLaunch) {
    SwapRefs<double> refs;
    expect(make_swap_refs(ptrs.data(), sc.hw.data(), R, r0, g, &offset, &refs), "make_swap_refs");
    const bool first = r0 == 0, last = r0 + refs.count >= R;
    for (int64_t t = 0; t < static_cast<int64_t>(out.size()); ++t) {
      const int x = static_cast<int>(t % sc.out_w), y = static_cast<int>((t / sc.out_w) % sc.out_h);
      const int64_t bc = t / (static_cast<int64_t>(sc.out_h) * sc.out_w);
      double acc = swap_forward_element(refs, index.data(), g, static_cast<int>(bc / sc.Cv),
                                        static_cast<int>(bc % sc.Cv), y, x, first ? 0.0 : out[t]);
      if (last && g.mean) {
        const int n = swap_count(g, y, x);
        acc = n > 0 ? acc / n : 0.0;
      }
      out[t] = acc;
    }
  }
  double err = 0;
  for (size_t t = 0; t < out.size(); ++t) err = std::max(err, std::fabs(out[t] - expected[t]));
  char detail[200];
  std::snprintf(detail, sizeof detail, "p=%d s=%d pad=%d scale=%d refs=%d mean=%d err=%g", sc.p, sc.s, sc.pad,
                sc.scale, R, sc.mean, err);
  expect(err < 1e-12, "feature_swap forward", detail);

  // Backward: the adjoint, checked through <grad_out, forward(values)> = <backward(grad_out), values>
  // for random grad_out, plus determinism of the inverse map (stable sort).
  const SwapBackwardPlan plan = plan_feature_swap_backward(sc.hw.data(), R, g, /*sort_bytes=*/false);
  expect(plan.ok && plan.nk_total == nk_total, "backward plan", detail);
  std::vector<unsigned long long> keys(plan.num_cells);
  std::vector<int> cells(plan.num_cells);
  for (int64_t t = 0; t < plan.num_cells; ++t)
    swap_inverse_entry(index.data(), t, static_cast<int64_t>(sc.gqh) * sc.gqw, nk_total, plan.num_buckets - 1,
                       keys.data(), cells.data());
  std::vector<int64_t> order(plan.num_cells);
  for (int64_t t = 0; t < plan.num_cells; ++t) order[t] = t;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return keys[a] < keys[b]; });
  std::vector<unsigned long long> skeys(plan.num_cells);
  std::vector<int> scells(plan.num_cells);
  for (int64_t t = 0; t < plan.num_cells; ++t) {
    skeys[t] = keys[order[t]];
    scells[t] = cells[order[t]];
  }
  std::vector<int> bucket_start(plan.num_buckets + 1);
  for (int64_t k = 0; k <= plan.num_buckets; ++k)
    bucket_start[k] = lower_bound_key(skeys.data(), static_cast<int>(plan.num_cells), k);
  expect(bucket_start[plan.num_buckets] == plan.num_cells && (1ll << plan.end_bit) > plan.num_buckets - 1,
         "bucket bounds", detail);

  std::vector<double> grad_out(out.size());
  for (auto& x : grad_out) x = U(rng);
  double lhs = 0, rhs = 0;
  for (size_t t = 0; t < out.size(); ++t) lhs += grad_out[t] * out[t];
  int64_t off = 0;
  for (int r = 0; r < R; ++r) {
    SwapValueMap m;
    m.hv = sc.hw[2 * r];
    m.wv = sc.hw[2 * r + 1];
    swap_key_grid(m.hv, m.wv, sc.p, sc.s, sc.pad, sc.scale, &m.gkh, &m.gkw);
    m.offset = off;
    m.nk_total = nk_total;
    off += static_cast<int64_t>(m.gkh) * m.gkw;
    for (int b = 0; b < sc.B; ++b)
      for (int c = 0; c < sc.Cv; ++c)
        for (int yv = 0; yv < m.hv; ++yv)
          for (int xv = 0; xv < m.wv; ++xv) {
            const double gv =
                swap_backward_element(grad_out.data(), scells.data(), bucket_start.data(), m, g, b, c, yv, xv);
            rhs += gv * values[r][((static_cast<size_t>(b) * sc.Cv + c) * m.hv + yv) * m.wv + xv];
          }
  }
  std::snprintf(detail, sizeof detail, "p=%d s=%d pad=%d scale=%d refs=%d mean=%d <g,Fv>=%.12g <F*g,v>=%.12g",
                sc.p, sc.s, sc.pad, sc.scale, R, sc.mean, lhs, rhs);
  expect(std::fabs(lhs - rhs) < 1e-9 * (1 + std::fabs(lhs)), "feature_swap backward (adjoint)", detail);
}

void check_feature_swap() {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int> D(0, 1 << 30);
  int cases = 0;
  for (int p = 1; p <= 3; ++p)
    for (int s = 1; s <= 3; ++s)
      for (int pad = 0; pad <= 2; ++pad)
        for (int scale : {1, 2, 4}) {
          if (pad >= p + 1) continue;
          SwapCase sc;
          sc.B = 2;
          sc.Cv = 2;
          sc.p = p;
          sc.s = s;
          sc.pad = pad;
          sc.scale = scale;
          sc.mean = (cases % 2) == 0;
          const int R = cases % 7 == 0 ? 10 : 1 + cases % 3;  // 10 refs: two launches
          for (int r = 0; r < R; ++r) {
            const int hk = std::max(p, 1 + D(rng) % 7), wk = std::max(p, 1 + D(rng) % 8);
            sc.hw.push_back(hk * scale + D(rng) % scale);  // odd leftovers beyond the key map
            sc.hw.push_back(wk * scale + D(rng) % scale);
          }
          const int hq = p + D(rng) % 8, wq = p + D(rng) % 7;
          sc.gqh = grid_size(hq, p, s, pad);
          sc.gqw = grid_size(wq, p, s, pad);
          const int dh = ((sc.gqh - 1) * s + p - 2 * pad) * scale, dw = ((sc.gqw - 1) * s + p - 2 * pad) * scale;
          // Default size when positive, otherwise (and every third case) an override.
          sc.out_h = dh > 0 && cases % 3 ? dh : 1 + D(rng) % (hq * scale + 3);
          sc.out_w = dw > 0 && cases % 3 ? dw : 1 + D(rng) % (wq * scale + 3);
          check_swap_case(sc, rng);
          ++cases;
        }
  std::printf("feature_swap: %d random cases (forward vs scatter, backward adjoint)\n", cases);
}

void check_covering_windows() {
  int n = 0;
  for (int extent = 1; extent <= 13; ++extent)
    for (int step = 1; step <= 5; ++step)
      for (int offset = 0; offset <= 9; ++offset)
        for (int windows = 1; windows <= 6; ++windows)
          for (int pos = 0; pos < 40; ++pos) {
            int lo = -1, hi = -2;
            for (int w = 0; w < windows; ++w)
              if (w * step - offset <= pos && pos < w * step - offset + extent) {
                if (lo < 0) lo = w;
                hi = w;
              }
            const Range r = covering_windows(pos, offset, step, extent, windows);
            const bool ok = lo < 0 ? r.count() == 0 : (r.lo == lo && r.hi == hi);
            if (!ok) {
              char detail[120];
              std::snprintf(detail, sizeof detail, "pos=%d offset=%d step=%d extent=%d", pos, offset, step, extent);
              expect(false, "covering_windows", detail);
            }
            ++n;
          }
  std::printf("covering_windows: %d cases vs brute force\n", n);
}

// patch_dot / descriptor_entry against an explicit unfold (torch order: c, dy, dx).
void check_patch_dot() {
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> U(-1.0, 1.0);
  int n = 0;
  for (int p = 1; p <= 4; ++p)
    for (int pad = 0; pad <= 2; ++pad) {
      const int C = 3, H = 5 + p, W = 4 + p, s = 1 + (p + pad) % 2;
      std::vector<double> a(C * H * W), b(C * H * W);
      for (auto& x : a) x = U(rng);
      for (auto& x : b) x = U(rng);
      auto unfold = [&](const std::vector<double>& m, int y0, int x0) {
        std::vector<double> d(C * p * p, 0.0);
        for (int idx = 0; idx < C * p * p; ++idx) {
          const int2 e = descriptor_entry(idx, p);
          const int y = y0 + (e.y >> 16), x = x0 + (e.y & 0xffff);
          const int c = idx / (p * p), dy = (idx / p) % p, dx = idx % p;
          if (e.x != c || (e.y >> 16) != dy || (e.y & 0xffff) != dx) expect(false, "descriptor_entry");
          if (y >= 0 && y < H && x >= 0 && x < W) d[idx] = m[(c * H + y) * W + x];
        }
        return d;
      };
      const int gh = grid_size(H, p, s, pad), gw = grid_size(W, p, s, pad);
      for (int qi = 0; qi < gh * gw; ++qi)
        for (int ki = 0; ki < gh * gw; ki += 3) {
          const int qy = (qi / gw) * s - pad, qx = (qi % gw) * s - pad;
          const int ky = (ki / gw) * s - pad, kx = (ki % gw) * s - pad;
          const auto dq = unfold(a, qy, qx), dk = unfold(b, ky, kx);
          double ref = 0;
          for (size_t t = 0; t < dq.size(); ++t) ref += dq[t] * dk[t];
          const double got = patch_dot(a.data(), H, W, qy, qx, b.data(), H, W, ky, kx, C, p);
          if (std::fabs(got - ref) > 1e-12) expect(false, "patch_dot");
          ++n;
        }
    }
  std::printf("patch_dot/descriptor_entry: %d pairs vs explicit unfold\n", n);
}

float round_mantissa(float x, int kept_bits) {  // round to nearest even, kept_bits after the point
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const int drop = 23 - kept_bits;
  const uint32_t half = 1u << (drop - 1), mask = (1u << drop) - 1;
  const uint32_t rest = u & mask;
  u &= ~mask;
  if (rest > half || (rest == half && (u >> drop) & 1)) u += 1u << drop;
  std::memcpy(&x, &u, 4);
  return x;
}

float truncate_mantissa(float x, int kept_bits) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u &= ~((1u << (23 - kept_bits)) - 1);
  std::memcpy(&x, &u, 4);
  return x;
}

// The bound |s~ - s| <= delta behind candidate_margin, on emulated tensor-core inputs (TF32: 10
// stored bits, also truncated; BF16: 7), fp32 accumulation, descriptors of VGG-like length.
void check_margin() {
  std::mt19937 rng(99);
  std::uniform_real_distribution<float> U(0.0f, 1.0f);
  std::normal_distribution<float> N(0.0f, 1.0f);
  const int D = 2304;
  for (MatchPrecision prec : {MatchPrecision::kHigh, MatchPrecision::kMedium}) {
    const double tol = prec == MatchPrecision::kMedium ? 2e-3 : 1e-3;
    const double margin = candidate_margin(prec, D);
    const double delta = (margin + tol / 2) / 2;
    double worst = 0;
    for (int trial = 0; trial < 400; ++trial) {
      std::vector<float> q(D), k(D);
      const bool relu = trial % 2;  // nonnegative (post-ReLU) features align errors the most
      for (int i = 0; i < D; ++i) {
        q[i] = relu ? U(rng) * U(rng) : N(rng);
        k[i] = relu ? U(rng) : N(rng);
      }
      double dot = 0, nq = 0, nk = 0;
      float approx = 0, nqf = 0, nkf = 0;
      for (int i = 0; i < D; ++i) {
        dot += static_cast<double>(q[i]) * k[i];
        nq += static_cast<double>(q[i]) * q[i];
        nk += static_cast<double>(k[i]) * k[i];
        const float qr = prec == MatchPrecision::kMedium ? round_mantissa(q[i], 7) : truncate_mantissa(q[i], 10);
        const float kr = prec == MatchPrecision::kMedium ? round_mantissa(k[i], 7) : truncate_mantissa(k[i], 10);
        approx = std::fma(qr, kr, approx);
        nqf = std::fma(q[i], q[i], nqf);
        nkf = std::fma(k[i], k[i], nkf);
      }
      const double exact = dot / (std::sqrt(nq) * std::sqrt(nk));
      const double s_tilde = approx * (1.0f / std::sqrt(nqf)) * (1.0f / std::sqrt(nkf));
      worst = std::max(worst, std::fabs(s_tilde - exact));
    }
    char detail[160];
    std::snprintf(detail, sizeof detail, "%s: worst |s~ - s| = %.3g, delta = %.3g, margin T = %.3g",
                  prec == MatchPrecision::kMedium ? "bf16" : "tf32", worst, delta, margin);
    expect(worst <= delta, "candidate margin", detail);
    std::printf("candidate margin %s\n", detail);
  }
}

// Workspace sizing and key splitting of patch_match (host arithmetic only).
void check_patch_match_plan() {
  const int key_hw[] = {9, 14, 5, 5, 200, 3};
  PatchMatchArgs<float> a;
  a.B = 2;
  a.C = 7;
  a.Hq = 13;
  a.Wq = 11;
  a.num_keys = 3;
  a.key_hw = key_hw;
  a.patch_size = 3;
  a.padding = 1;
  a.num_sms = 132;
  PatchMatchPlan plan = plan_patch_match(a);
  expect(plan.ok && plan.D == 63 && plan.gqh == 13 && plan.gqw == 11 && plan.nq == 143 && plan.q_tiles == 3,
         "patch_match plan shape");
  // 10 key tiles; float "highest" runs on tensor cores (TF32 candidates + fp32 re-scoring) on sm_80+
  expect(plan.max_nk == 600 && plan.splits == 10 && plan.tensor_cores, "patch_match plan splits");
  expect(plan.workspace_bytes > 0 && plan.workspace_bytes < (1u << 20), "patch_match plan workspace");
  a.precision = MatchPrecision::kMedium;
  expect(plan_patch_match(a).tensor_cores, "tensor cores for medium");
  a.compute_capability = 75;
  expect(!plan_patch_match(a).tensor_cores, "no tensor cores below sm_80");
  expect(!plan_patch_match(PatchMatchArgs<double>{}).ok, "empty args rejected");
  const int small[] = {1, 14};
  a.key_hw = small;
  a.num_keys = 1;
  a.padding = 0;
  expect(!plan_patch_match(a).ok, "key smaller than a patch rejected");
  expect(candidate_margin(MatchPrecision::kMedium, 2304) > candidate_margin(MatchPrecision::kHigh, 2304) &&
             candidate_margin(MatchPrecision::kHigh, 2304) > 0,
         "candidate margins");
  // "highest" re-scores a wider band than "high" (its tolerance is 1e-5, not 1e-3).
  expect(candidate_margin(MatchPrecision::kHighest, 2304) > candidate_margin(MatchPrecision::kHigh, 2304),
         "candidate margin highest");
  std::printf("patch_match plan: sizes, splits, tensor-core choice\n");
}

}  // namespace

int main() {
  check_patch_match_plan();
  check_covering_windows();
  check_patch_dot();
  check_feature_swap();
  check_margin();
  if (failures) {
    std::printf("host_check: %d FAILED\n", failures);
    return 1;
  }
  std::printf("host_check: all passed\n");
  return 0;
}
