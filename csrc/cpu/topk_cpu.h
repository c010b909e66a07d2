// The K best (value, index) pairs of a query patch, kept while the key patches stream past.
//
// A list holds `kk` slots at a fixed stride (one lane of a vector layout, or a plain array),
// sorted by value descending, then index ascending: "ties go to the smallest index" for any
// order in which the keys arrive. Empty slots hold (-inf, largest index), which every real
// candidate outranks.
#pragma once

#include <cstdint>

namespace srntt {

// Below float64, candidates whose float32 values lie within kNearUlps rounding steps of |q| of
// each other are re-scored in float64 (the torch backend's NEAR_ULPS, docs/CONTRACT.md §2, §2a).
constexpr double kNearUlps = 64;

template <typename T, typename I>
inline bool ranks_above(T a, I ia, T b, I ib) {
  return a > b || (a == b && ia < ib);
}

// Inserts (v, i), which ranks above the last slot, and drops the last slot's pair.
template <typename T, typename I>
inline void insert_ranked(T* vals, I* idx, int64_t stride, int64_t kk, T v, I i) {
  int64_t s = kk - 1;
  while (s > 0 && ranks_above(v, i, vals[(s - 1) * stride], idx[(s - 1) * stride])) {
    vals[s * stride] = vals[(s - 1) * stride];
    idx[s * stride] = idx[(s - 1) * stride];
    --s;
  }
  vals[s * stride] = v;
  idx[s * stride] = i;
}

}  // namespace srntt
