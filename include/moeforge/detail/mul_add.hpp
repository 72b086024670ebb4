// Multiply-adds whose rounding no compiler flag changes. Left as a * b + c,
// a product followed by a sum is fused into one FMA wherever the optimiser
// happens to see the pattern (GCC's default -ffp-contract=fast: RoPE was
// fused at -O2 and not at -O3), vector intrinsics and Eigen's packets
// included, so the same program gave other logits at another -O level. The
// inference path writes each one through mul_add instead: one rounding on
// every target with FMA, two where there is none and nothing can fuse them.
#pragma once

#include <cmath>

#include "moeforge/core/tensor.hpp"

namespace moeforge::detail {

/// a·b + c, rounded once where the target has FMA (as the vector forms
/// are), twice where it has none. (std::fma without hardware FMA is a
/// library call, and the separate form is what the compiler contracts.)
inline float mul_add(float a, float b, float c) {
#if defined(__FMA__) || defined(FP_FAST_FMAF)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

/// Σ a[d]·b[d] in 16 lanes (d mod 16), summed in lane order at the end: an
/// order fixed by n alone, whatever the addresses' alignment (Eigen's
/// reductions start at the first aligned element).
inline float dot(const float* a, const float* b, index_t n) {
  constexpr index_t lanes = 16;
  float acc[lanes] = {};
  index_t d = 0;
  for (; d + lanes <= n; d += lanes)
    for (index_t l = 0; l < lanes; ++l) acc[l] = mul_add(a[d + l], b[d + l], acc[l]);
  for (index_t l = 0; d < n; ++d, ++l) acc[l] = mul_add(a[d], b[d], acc[l]);
  float sum = 0.0f;
  for (const float v : acc) sum += v;
  return sum;
}

}  // namespace moeforge::detail
