// The FFN activations, one value at a time (activate) and along a row
// (activate_row). The row form is what the kernel runs on every neuron of
// every token, so SiLU is vectorised there, and it computes lane by lane
// exactly what the scalar form computes, bit for bit: which neurons share a
// vector depends on where a job's neurons start, and that depends on the
// routing plan (a partitioned expert must still equal the unpartitioned one,
// a job of 7 neurons the first 7 of a job of 16).
//
// SiLU's exponential is therefore our own, not libm's (whose scalar and
// vector versions differ): a Cody-Waite reduction by ln 2 and a degree-6
// polynomial, within 1.01 ulp of exp, and SiLU within 2.4 ulp of its exact
// value on [-87, 87] (every eighth float; test_runtime checks 3 ulp). Past
// its range exp is e^-87 below and infinite above (so SiLU gives -0 below
// x = -88, where the true value is under 1e-36 in magnitude). Every
// multiply-add in it is written as one fused operation where the target has
// FMA and as two roundings where it has none, never left to the compiler,
// which may fuse a product into a following sum (-ffp-contract) in one
// form and not the other.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string_view>

#include "moeforge/core/error.hpp"
#include "moeforge/core/tensor.hpp"
#include "moeforge/detail/mul_add.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace moeforge {

enum class activation { silu, gelu, relu };

inline std::string_view activation_name(activation a) {
  switch (a) {
    case activation::silu: return "silu";
    case activation::gelu: return "gelu";
    case activation::relu: return "relu";
  }
  return "?";
}

inline activation parse_activation(std::string_view name) {
  if (name == "silu" || name == "swish") return activation::silu;
  if (name == "gelu" || name == "gelu_pytorch_tanh" || name == "gelu_new") return activation::gelu;
  if (name == "relu") return activation::relu;
  throw config_error(detail::cat("activation '", name, "' is not supported (expected silu, gelu or relu)"));
}

namespace detail {

// The exponential's constants: its input range (exp(-87) is still a normal
// float, exp(88) below the largest), ln 2 split so that n·ln2_hi is exact
// for the n that occur, and Cephes' minimax polynomial for e^r − 1 − r over
// |r| ≤ ln 2 / 2, divided by r².
constexpr float exp_lo = -87.0f, exp_hi = 88.0f;
constexpr float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
constexpr float exp_poly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

/// The comparisons of minps/maxps: a NaN in either operand gives b.
inline float min_of(float a, float b) { return a < b ? a : b; }
inline float max_of(float a, float b) { return a > b ? a : b; }

/// e^x as 2^n · (1 + r + r²·p(r)) with n = round(x·log2 e), r = x − n·ln 2,
/// for x in [exp_lo, exp_hi]; e^exp_lo below, +inf above (a NaN gives e^exp_hi).
inline float clamped_exp(float x) {
  const bool over = x > exp_hi;
  x = max_of(min_of(x, exp_hi), exp_lo);
  const float n = std::nearbyint(x * log2e);
  float r = mul_add(n, -ln2_hi, x);
  r = mul_add(n, -ln2_lo, r);
  float p = exp_poly[0];
  for (int i = 1; i < 6; ++i) p = mul_add(p, r, exp_poly[i]);
  const float r2 = r * r;
  const float y = mul_add(p, r2, r) + 1.0f;
  const std::uint32_t bits = std::uint32_t(int(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return over ? std::numeric_limits<float>::infinity() : y * scale;  // exact: y is in [0.7, 1.5] and the product a normal float
}

/// x·sigmoid(x) = x / (1 + e^−x).
inline float silu(float x) { return x / (1.0f + clamped_exp(-x)); }

#if defined(__AVX2__) && defined(__FMA__)
#if defined(__AVX512F__)
using act_vector = __m512;
constexpr index_t act_lanes = 16;
inline act_vector act_load(const float* p) { return _mm512_loadu_ps(p); }
inline void act_store(float* p, act_vector v) { _mm512_storeu_ps(p, v); }
inline act_vector act_set(float v) { return _mm512_set1_ps(v); }
inline act_vector act_fma(act_vector a, act_vector b, act_vector c) { return _mm512_fmadd_ps(a, b, c); }
inline act_vector act_mul(act_vector a, act_vector b) { return _mm512_mul_ps(a, b); }
inline act_vector act_add(act_vector a, act_vector b) { return _mm512_add_ps(a, b); }
inline act_vector act_div(act_vector a, act_vector b) { return _mm512_div_ps(a, b); }
inline act_vector act_min(act_vector a, act_vector b) { return _mm512_min_ps(a, b); }
inline act_vector act_max(act_vector a, act_vector b) { return _mm512_max_ps(a, b); }
inline act_vector act_round(act_vector a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/// a > b ? then : otherwise, lane by lane (false for a NaN).
inline act_vector act_if_greater(act_vector a, act_vector b, act_vector then, act_vector otherwise) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), otherwise, then);
}
inline act_vector act_exp2i(act_vector n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#else
using act_vector = __m256;
constexpr index_t act_lanes = 8;
inline act_vector act_load(const float* p) { return _mm256_loadu_ps(p); }
inline void act_store(float* p, act_vector v) { _mm256_storeu_ps(p, v); }
inline act_vector act_set(float v) { return _mm256_set1_ps(v); }
inline act_vector act_fma(act_vector a, act_vector b, act_vector c) { return _mm256_fmadd_ps(a, b, c); }
inline act_vector act_mul(act_vector a, act_vector b) { return _mm256_mul_ps(a, b); }
inline act_vector act_add(act_vector a, act_vector b) { return _mm256_add_ps(a, b); }
inline act_vector act_div(act_vector a, act_vector b) { return _mm256_div_ps(a, b); }
inline act_vector act_min(act_vector a, act_vector b) { return _mm256_min_ps(a, b); }
inline act_vector act_max(act_vector a, act_vector b) { return _mm256_max_ps(a, b); }
inline act_vector act_round(act_vector a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline act_vector act_if_greater(act_vector a, act_vector b, act_vector then, act_vector otherwise) {
  return _mm256_blendv_ps(otherwise, then, _mm256_cmp_ps(a, b, _CMP_GT_OQ));
}
inline act_vector act_exp2i(act_vector n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#endif

/// silu on a vector: clamped_exp and silu above, operation for operation.
inline act_vector silu(act_vector x) {
  const act_vector neg = act_mul(x, act_set(-1.0f));
  const act_vector m = act_max(act_min(neg, act_set(exp_hi)), act_set(exp_lo));
  const act_vector n = act_round(act_mul(m, act_set(log2e)));
  act_vector r = act_fma(n, act_set(-ln2_hi), m);
  r = act_fma(n, act_set(-ln2_lo), r);
  act_vector p = act_set(exp_poly[0]);
  for (int i = 1; i < 6; ++i) p = act_fma(p, r, act_set(exp_poly[i]));
  const act_vector y = act_add(act_fma(p, act_mul(r, r), r), act_set(1.0f));
  const act_vector e = act_if_greater(neg, act_set(exp_hi), act_set(std::numeric_limits<float>::infinity()), act_mul(y, act_exp2i(n)));
  return act_div(x, act_add(act_set(1.0f), e));
}

/// out[i] = silu(gate[i]) · up[i] (up null: silu(gate[i])) for a whole vector.
inline void silu_lanes(const float* gate, const float* up, float* out) {
  const act_vector s = silu(act_load(gate));
  act_store(out, up ? act_mul(s, act_load(up)) : s);
}
#endif

}  // namespace detail

/// silu(x) = x·sigmoid(x); gelu is the tanh approximation used by most LLMs.
inline float activate(activation a, float v) {
  switch (a) {
    case activation::silu: return detail::silu(v);
    case activation::gelu: {
      const float c = 0.7978845608028654f;  // sqrt(2/pi)
      return 0.5f * v * (1.0f + std::tanh(c * detail::mul_add(0.044715f * v * v, v, v)));
    }
    case activation::relu: return v > 0.0f ? v : 0.0f;
  }
  return v;
}

/// out[i] = activate(a, gate[i]) · up[i] for i < n, or activate(a, gate[i])
/// when up is null (an ungated FFN): the same bits as the scalar form, SiLU
/// a vector at a time. out may be gate or up.
inline void activate_row(activation a, const float* gate, const float* up, float* out, index_t n) {
  index_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (a == activation::silu) {
    using detail::act_lanes;
    for (; i + act_lanes <= n; i += act_lanes) detail::silu_lanes(gate + i, up ? up + i : nullptr, out + i);
    if (i < n) {  // the last, partial vector through a padded copy: the same lanes' arithmetic
      float g[act_lanes] = {}, u[act_lanes] = {}, o[act_lanes];
      std::copy_n(gate + i, n - i, g);
      if (up) std::copy_n(up + i, n - i, u);
      detail::silu_lanes(g, up ? u : nullptr, o);
      std::copy_n(o, n - i, out + i);
    }
    return;
  }
#endif
  for (; i < n; ++i) out[i] = up ? activate(a, gate[i]) * up[i] : activate(a, gate[i]);
}

}  // namespace moeforge
