// Tensor vocabulary: Eigen aliases for row-major float matrices, the on-disk
// dtypes and their conversion to float, and finiteness checks.
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "moeforge/core/error.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace moeforge {

/// Sizes and indices (named index_t: POSIX declares a global function `index`).
using index_t = Eigen::Index;

/// Row-major float matrix. Weights use the Hugging Face `[out, in]` layout;
/// activations are `[tokens, features]` (one token per row).
using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using vector = Eigen::VectorXf;
using matrix_ref = Eigen::Ref<matrix>;
using const_matrix_ref = Eigen::Ref<const matrix>;

enum class dtype { f32, f16, bf16 };

inline std::size_t dtype_size(dtype t) { return t == dtype::f32 ? 4 : 2; }

inline std::string_view dtype_name(dtype t) {
  switch (t) {
    case dtype::f32: return "F32";
    case dtype::f16: return "F16";
    case dtype::bf16: return "BF16";
  }
  return "?";
}

/// The type's name in PyTorch, as Hugging Face's config.json gives it (torch_dtype).
inline std::string_view torch_dtype_name(dtype t) {
  switch (t) {
    case dtype::f32: return "float32";
    case dtype::f16: return "float16";
    case dtype::bf16: return "bfloat16";
  }
  return "?";
}

/// A BF16 value as stored: the upper 16 bits of an IEEE float (weights kept
/// in BF16 are arrays of these; the kernels widen them in registers).
struct bfloat16 {
  std::uint16_t bits;
};

inline float bf16_to_f32(std::uint16_t h) {
  const std::uint32_t bits = std::uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

/// Round to nearest even; NaN stays NaN.
inline std::uint16_t f32_to_bf16(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return std::uint16_t((bits >> 16) | 0x40);
  bits += 0x7fff + ((bits >> 16) & 1);
  return std::uint16_t(bits >> 16);
}

/// Whether every value is a BF16 value (its low 16 bits zero), so storing
/// them in BF16 loses nothing.
inline bool exact_in_bf16(const float* x, std::size_t n) {
  std::uint32_t low = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    low |= bits & 0xffffu;
  }
  return low == 0;
}

/// Parses "f32" or "bf16" (or F32, BF16), the weight types
/// the kernels run on; throws config_error naming the text.
inline dtype parse_weight_dtype(std::string_view text) {
  if (text == "f32" || text == "F32") return dtype::f32;
  if (text == "bf16" || text == "BF16") return dtype::bf16;
  throw config_error(detail::cat("weight dtype '", text, "': expected f32 or bf16"));
}

inline float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1f;
  const std::uint32_t mant = h & 0x3ff;
  std::uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: renormalise
    std::uint32_t m = mant;
    std::uint32_t e = 113;
    while (!(m & 0x400)) {
      m <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((m & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

/// `count` values stored as `type` (F32, BF16 or F16) at `src`, any
/// alignment, as F32 into out: exact. BF16 in vectors (GCC leaves the scalar
/// loop scalar at -O2, and it was most of a BF16 model's loading time).
inline void widen_to_f32(const void* src, dtype type, std::size_t count, float* out) {
  const char* p = static_cast<const char*>(src);
  if (type == dtype::f32) return void(std::memcpy(out, p, count * sizeof(float)));
  std::size_t k = 0;
  if (type == dtype::bf16) {
#if defined(__AVX512F__)
    for (; k + 16 <= count; k += 16)
      _mm512_storeu_si512(out + k, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2 * k))), 16));
#elif defined(__AVX2__) && defined(__FMA__)
    for (; k + 8 <= count; k += 8)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k),
                          _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * k))), 16));
#endif
  }
  for (; k < count; ++k) {
    std::uint16_t h;
    std::memcpy(&h, p + 2 * k, 2);
    out[k] = type == dtype::bf16 ? bf16_to_f32(h) : f16_to_f32(h);
  }
}

/// Round to nearest even, overflow to Inf, NaN stays NaN.
inline std::uint16_t f32_to_f16(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const std::uint16_t sign = std::uint16_t((bits >> 16) & 0x8000);
  const std::uint32_t abs = bits & 0x7fffffffu;
  if (abs >= 0x7f800000u) return std::uint16_t(sign | 0x7c00 | (abs > 0x7f800000u ? 0x200 : 0));
  if (abs >= 0x477ff000u) return std::uint16_t(sign | 0x7c00);  // rounds past 65504
  if (abs < 0x38800000u) {  // result is subnormal or zero
    if (abs < 0x33000000u) return sign;
    const std::uint32_t e = abs >> 23;
    const std::uint32_t m = (abs & 0x7fffff) | 0x800000;
    const std::uint32_t shift = 126 - e;  // 14..24
    std::uint32_t half = m >> shift;
    const std::uint32_t rest = m & ((1u << shift) - 1);
    const std::uint32_t mid = 1u << (shift - 1);
    if (rest > mid || (rest == mid && (half & 1))) ++half;
    return std::uint16_t(sign | half);
  }
  std::uint32_t v = abs - 0x38000000u;  // rebias exponent 127 -> 15
  v += 0xfff + ((v >> 13) & 1);
  return std::uint16_t(sign | (v >> 13));
}

/// The value a file storing `v` in `type` holds (rounded to nearest even).
inline float stored_value(dtype type, float v) {
  if (type == dtype::bf16) return bf16_to_f32(f32_to_bf16(v));
  if (type == dtype::f16) return f16_to_f32(f32_to_f16(v));
  return v;
}

/// Whether every value is exact in `type`, so storing them in it loses
/// nothing (always, for F32).
inline bool exact_in(dtype type, const float* x, std::size_t n) {
  if (type == dtype::bf16) return exact_in_bf16(x, n);
  if (type == dtype::f32) return true;
  for (std::size_t i = 0; i < n; ++i)
    if (!(stored_value(type, x[i]) == x[i])) return false;
  return true;
}

namespace detail {

/// Whether every entry is finite: x − x is 0 for every finite x and NaN
/// otherwise, so one vectorised sum tells (Eigen's allFinite tests value by value).
template <class Derived>
bool all_finite(const Eigen::DenseBase<Derived>& m) {
  return !std::isnan((m.derived().array() - m.derived().array()).sum());
}

/// The error for a non-finite `value` at [r, c] of the tensor `what`.
inline value_error non_finite_error(const std::string& what, float value, index_t r, index_t c) {
  return value_error(cat(what, ": non-finite value ", value, " at [", r, ", ", c, "]"));
}

/// Throws value_error naming `what` and the first non-finite entry.
template <class Derived>
void require_finite(const Eigen::DenseBase<Derived>& m, const std::string& what) {
  if (all_finite(m)) return;
  for (index_t r = 0; r < m.rows(); ++r)
    for (index_t c = 0; c < m.cols(); ++c)
      if (!std::isfinite(m(r, c))) throw non_finite_error(what, m(r, c), r, c);
}

/// Throws value_error "<row name> r has a NaN or Inf value" for the first
/// row r of m that has one (checked with one sum while all are finite); the
/// name's parts are joined only then, as the kernels check every call.
template <class Derived, class... Name>
void require_finite_rows(const Eigen::DenseBase<Derived>& m, const Name&... row_name) {
  if (all_finite(m)) return;
  for (index_t r = 0; r < m.rows(); ++r)
    if (!m.derived().row(r).allFinite()) throw value_error(cat(row_name..., " ", r, " has a NaN or Inf value"));
}

/// Throws shape_error unless `m` is rows × cols; the name's parts are
/// joined only then.
template <class Derived, class... Name>
void require_shape(const Eigen::DenseBase<Derived>& m, index_t rows, index_t cols, const Name&... what) {
  if (m.rows() != rows || m.cols() != cols)
    throw shape_error(cat(what..., ": shape [", m.rows(), ", ", m.cols(), "], expected [", rows, ", ", cols, "]"));
}

}  // namespace detail
}  // namespace moeforge
