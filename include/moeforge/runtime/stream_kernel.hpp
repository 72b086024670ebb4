// The weight-streaming path for few tokens: out = b·aᵀ where a is a block of
// weight rows (streamed once from memory) and b holds at most four token
// vectors (kept in L1). Each pass reads several weight rows at once into
// register-resident accumulators, so the loads of independent rows overlap
// and the memory system sees several sequential streams per core, which is
// what it takes to approach the machine's bandwidth with one or two tokens.
#pragma once

#include <algorithm>

#include "moeforge/core/tensor.hpp"
#include "moeforge/runtime/gemm.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace moeforge::runtime::detail {

#if defined(__AVX2__) && defined(__FMA__)
constexpr bool stream_kernel_available = true;

// The vector the streaming loops run on: 16 lanes and 32 registers with
// AVX-512, else 8 lanes and 16 registers.
#if defined(__AVX512F__)
using stream_vec = __m512;
constexpr index_t stream_lanes = 16;
inline stream_vec stream_zero() { return _mm512_setzero_ps(); }
inline stream_vec stream_load(const float* p) { return _mm512_loadu_ps(p); }
inline stream_vec stream_fma(stream_vec a, stream_vec b, stream_vec c) { return _mm512_fmadd_ps(a, b, c); }
// Through memory: GCC 12 warns falsely inside its 512→256-bit extract intrinsics.
inline __m256 stream_fold(stream_vec v) {
  alignas(64) float f[16];
  _mm512_store_ps(f, v);
  return _mm256_add_ps(_mm256_load_ps(f), _mm256_load_ps(f + 8));
}
#else
using stream_vec = __m256;
constexpr index_t stream_lanes = 8;
inline stream_vec stream_zero() { return _mm256_setzero_ps(); }
inline stream_vec stream_load(const float* p) { return _mm256_loadu_ps(p); }
inline stream_vec stream_fma(stream_vec a, stream_vec b, stream_vec c) { return _mm256_fmadd_ps(a, b, c); }
inline __m256 stream_fold(stream_vec v) { return v; }
#endif

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 d = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

// R weight rows × N tokens per pass; the order of every sum is fixed by
// (k, R, N) alone, so results do not depend on how rows are split across threads.
template <int N, int R>
inline void stream_rows(const float* a, index_t lda, const float* b, index_t ldb, index_t k, float* out, index_t ldo) {
  stream_vec acc[R][N];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < N; ++p) acc[r][p] = stream_zero();
  index_t i = 0;
  for (; i + stream_lanes <= k; i += stream_lanes) {
    stream_vec bv[N];
    for (int p = 0; p < N; ++p) bv[p] = stream_load(b + p * ldb + i);
    for (int r = 0; r < R; ++r) {
      const stream_vec av = stream_load(a + r * lda + i);
      for (int p = 0; p < N; ++p) acc[r][p] = stream_fma(av, bv[p], acc[r][p]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < N; ++p) {
      float s = hsum(stream_fold(acc[r][p]));
      for (index_t j = i; j < k; ++j) s += a[r * lda + j] * b[p * ldb + j];
      out[p * ldo + r] = s;
    }
}
// Token groups of up to four over the same R weight rows: the rows come from
// memory once and from L1 for the later groups.
template <int R>
inline void stream_tokens(const float* a, index_t lda, const float* b, index_t ldb, index_t n, index_t k, float* out, index_t ldo) {
  for (index_t p = 0; p < n; p += 4) {
    const float* bp = b + p * ldb;
    float* op = out + p * ldo;
    switch (std::min<index_t>(4, n - p)) {
      case 1: stream_rows<1, R>(a, lda, bp, ldb, k, op, ldo); break;
      case 2: stream_rows<2, R>(a, lda, bp, ldb, k, op, ldo); break;
      case 3: stream_rows<3, R>(a, lda, bp, ldb, k, op, ldo); break;
      default: stream_rows<4, R>(a, lda, bp, ldb, k, op, ldo); break;
    }
  }
}

/// out[p, r] = Σ_i b[p, i]·a[r, i] for p < n ≤ stream_max_tokens, r < rows;
/// all three row-major with the given leading dimensions.
inline void stream_product(const float* a, index_t lda, index_t rows, const float* b, index_t ldb, index_t n, index_t k, float* out,
                           index_t ldo) {
  // As many rows in flight as the accumulators of a token group leave
  // registers for: each row is one more sequential stream from memory.
  index_t r = 0;
  if (stream_lanes == 16 && n <= 2)
    for (; r + 8 <= rows; r += 8) stream_tokens<8>(a + r * lda, lda, b, ldb, n, k, out + r, ldo);
  if (n <= 2 || (stream_lanes == 16 && n <= 4))
    for (; r + 4 <= rows; r += 4) stream_tokens<4>(a + r * lda, lda, b, ldb, n, k, out + r, ldo);
  for (; r + 2 <= rows; r += 2) stream_tokens<2>(a + r * lda, lda, b, ldb, n, k, out + r, ldo);
  for (; r < rows; ++r) stream_tokens<1>(a + r * lda, lda, b, ldb, n, k, out + r, ldo);
}
/// Most token rows the streaming path takes; larger blocks use the packed GEMM,
/// whose packing of the weights only pays off once enough tokens reuse them.
/// Measured on one core, 2×256×2048 weight blocks from DRAM, streaming time /
/// packed GEMM time: with AVX2 (Zen 3) 0.30 at 4 tokens, 0.54 at 16, 0.73 at 32,
/// 0.93 at 48, 1.09 at 64; with AVX-512 (Zen 5), whose GEMM is twice as wide,
/// 0.47 at 1, 0.72 at 4, 1.19 at 6 and 1.60 at 8.
constexpr index_t stream_max_tokens = stream_lanes == 16 ? 4 : 48;
#else
constexpr bool stream_kernel_available = false;
constexpr index_t stream_max_tokens = 48;
inline void stream_product(const float*, index_t, index_t, const float*, index_t, index_t, index_t, float*, index_t) {}
#endif

/// A block of weight rows as packed_product takes it.
template <class Block>
inline weight_rows rows_of(const Block& a) {
  return {a.data(), a.outerStride(), a.rows()};
}

/// [b·a₁ᵀ | b·a₂ᵀ | …] for row-major weight blocks of b.cols() columns each:
/// streamed when b has few rows, else the packed GEMM, which packs b once for
/// all the blocks (Eigen's GEMM when the CPU lacks AVX2/FMA).
inline matrix times_transpose(std::initializer_list<weight_rows> a, const_matrix_ref b) {
  index_t n = 0;
  for (const auto& blk : a) n += blk.rows;
  matrix out(b.rows(), n);
  if (b.rows() == 0 || n == 0) return out;
  if (stream_kernel_available && b.rows() > stream_max_tokens) {
    packed_product(a, b.data(), b.outerStride(), b.rows(), b.cols(), out.data(), out.outerStride());
    return out;
  }
  index_t col0 = 0;
  for (const auto& blk : a) {
    if (stream_kernel_available) {
      stream_product(blk.data, blk.ld, blk.rows, b.data(), b.outerStride(), b.rows(), b.cols(), out.data() + col0, out.outerStride());
    } else {
      const Eigen::Map<const matrix, 0, Eigen::OuterStride<>> w(blk.data, blk.rows, b.cols(), Eigen::OuterStride<>(blk.ld));
      out.middleCols(col0, blk.rows).noalias() = b * w.transpose();
    }
    col0 += blk.rows;
  }
  return out;
}

}  // namespace moeforge::runtime::detail
