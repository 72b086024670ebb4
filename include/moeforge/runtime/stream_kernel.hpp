// The weight-streaming path for few tokens of runtime::project (row-major
// weights: attention, routers, the classifier; the FFN kernel runs on the
// panels of gemm.hpp instead): out = b·aᵀ where a is a block of
// weight rows (streamed once from memory, never packed) and b a few token
// vectors (kept in L1/L2), each given by a pointer so a job's tokens need not be
// gathered. Each pass reads several weight rows at once into register-resident
// accumulators, so the loads of independent rows overlap and the memory system
// sees several sequential streams per core, which is what it takes to approach
// the machine's bandwidth with one or two tokens.
#pragma once

#include <algorithm>
#include <vector>

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

/// Most token rows the streaming path takes; larger blocks use the panel GEMM,
/// whose packing of the weights only pays off once enough tokens reuse them.
/// Measured on one core, weight blocks from DRAM, streaming time / packed GEMM
/// time: with AVX2 (Zen 3; 2×256×2048 blocks) 0.30 at 4 tokens, 0.54 at 16,
/// 0.73 at 32, 0.93 at 48, 1.09 at 64; with AVX-512 (Zen 5; 256×2048 blocks,
/// the 6×4 tiles below) 0.61 at 8, 0.71 at 16, 0.81 at 24, 0.83 at 32, 0.88 at
/// 48, 0.96 at 64 (and at 256×704: 0.58, 0.64, 0.76, 0.84, 0.93, 1.00).
constexpr index_t stream_max_tokens = stream_lanes == 16 ? 32 : 48;

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 d = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

// R weight rows × N tokens per pass; the order of every sum is fixed by
// (k, R, N) alone, so results do not depend on how rows are split across threads.
template <int N, int R>
inline void stream_rows(const float* a, index_t lda, const float* const* b, index_t k, float* out, index_t ldo) {
  stream_vec acc[R][N];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < N; ++p) acc[r][p] = stream_zero();
  index_t i = 0;
  for (; i + stream_lanes <= k; i += stream_lanes) {
    stream_vec bv[N];
    for (int p = 0; p < N; ++p) bv[p] = stream_load(b[p] + i);
    for (int r = 0; r < R; ++r) {
      const stream_vec av = stream_load(a + r * lda + i);
      for (int p = 0; p < N; ++p) acc[r][p] = stream_fma(av, bv[p], acc[r][p]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < N; ++p) {
      float s = hsum(stream_fold(acc[r][p]));
      for (index_t j = i; j < k; ++j) s += a[r * lda + j] * b[p][j];
      out[p * ldo + r] = s;
    }
}
// Token groups of up to four over the same R weight rows: the rows come from
// memory once and from L1 for the later groups.
template <int R>
inline void stream_tokens(const float* a, index_t lda, const float* const* b, index_t n, index_t k, float* out, index_t ldo) {
  for (index_t p = 0; p < n; p += 4) {
    float* op = out + p * ldo;
    switch (std::min<index_t>(4, n - p)) {
      case 1: stream_rows<1, R>(a, lda, b + p, k, op, ldo); break;
      case 2: stream_rows<2, R>(a, lda, b + p, k, op, ldo); break;
      case 3: stream_rows<3, R>(a, lda, b + p, k, op, ldo); break;
      default: stream_rows<4, R>(a, lda, b + p, k, op, ldo); break;
    }
  }
}

#if defined(__AVX512F__)
// Three tokens or more (AVX-512 only): tiles of up to 6 weight rows × 4
// tokens, whose 24 accumulators, 6 row vectors and a token vector fill the 32
// registers, so every k step loads 10 vectors for 24 FMAs (88% of the FMA peak
// with data in L1/L2; at 3-4 tokens on cold 256×2048 blocks, 0.6 of the time
// stream_rows takes, whose compiled loop reloads the rows for every token).
// The depth is cut into blocks of stream_block_depth
// so a tile's rows stay in L1 while every token group passes over them (the
// tokens stream from L2); accumulators are carried through memory between
// blocks, which leaves each sum's order — lane partials over k ascending, then
// the fold and the scalar tail — exactly that of stream_rows. While the later
// token groups compute, the next rows are prefetched. One or two tokens keep
// stream_rows' eight rows in flight: there, the rows' bandwidth is all that counts.
constexpr int stream_block_rows = 6, stream_block_tokens = 4;
constexpr index_t stream_block_depth = 1024;

/// A load the compiler cannot fold into the FMAs that use it: folded, a row
/// vector would be loaded once per token instead of once per k step.
inline stream_vec stream_load_kept(const float* p) {
#if defined(__GNUC__)
  stream_vec v;
  asm("vmovups %1, %0" : "=v"(v) : "m"(*reinterpret_cast<const stream_vec*>(p)));
  return v;
#else
  return stream_load(p);
#endif
}

template <int N, int R>
inline void stream_tile(const float* a, index_t lda, const float* const* b, index_t i0, index_t i1, stream_vec* acc, bool first,
                        const float* pf, index_t pf_rows) {
  stream_vec c[R][N];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < N; ++p) c[r][p] = first ? stream_zero() : acc[r * N + p];
  for (index_t i = i0; i < i1; i += stream_lanes) {
    for (index_t q = 0; q < pf_rows; ++q) _mm_prefetch(reinterpret_cast<const char*>(pf + q * lda + i), _MM_HINT_T0);
    stream_vec av[R];
    for (int r = 0; r < R; ++r) av[r] = stream_load_kept(a + r * lda + i);
    for (int p = 0; p < N; ++p) {
      const stream_vec bv = stream_load(b[p] + i);
      for (int r = 0; r < R; ++r) c[r][p] = stream_fma(av[r], bv, c[r][p]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < N; ++p) acc[r * N + p] = c[r][p];
}

/// R (≤ 6) weight rows × n tokens; `next` (next_rows rows) is prefetched.
template <int R>
inline void stream_block(const float* a, index_t lda, const float* const* b, index_t n, index_t k, float* out, index_t ldo,
                         const float* next, index_t next_rows) {
  alignas(64) stream_vec acc[stream_block_rows * stream_max_tokens];
  const index_t kv = k / stream_lanes * stream_lanes;
  // Token groups of near-equal size (10 tokens: 4, 3, 3 rather than 4, 4, 2),
  // so no group is left with a lone token whose tile would wait on its loads.
  const index_t groups = (n + stream_block_tokens - 1) / stream_block_tokens;
  const auto group_start = [&](index_t g) { return g * (n / groups) + std::min(g, n % groups); };
  // The next rows are shared out among the token groups after the first (which
  // itself waits on these rows), or all go to the only group.
  const index_t sharers = std::max<index_t>(1, groups - 1);
  for (index_t i0 = 0; i0 < kv; i0 += stream_block_depth) {
    const index_t i1 = std::min(kv, i0 + stream_block_depth);
    for (index_t g = 0; g < groups; ++g) {
      const float* pf = nullptr;
      index_t pf_rows = 0;
      if (next && (groups == 1 || g > 0)) {
        const index_t j = groups == 1 ? 0 : g - 1, lo = j * next_rows / sharers, hi = (j + 1) * next_rows / sharers;
        pf = next + lo * lda, pf_rows = hi - lo;
      }
      const index_t p = group_start(g);
      stream_vec* c = acc + p * R;
      switch (group_start(g + 1) - p) {
        case 1: stream_tile<1, R>(a, lda, b + p, i0, i1, c, i0 == 0, pf, pf_rows); break;
        case 2: stream_tile<2, R>(a, lda, b + p, i0, i1, c, i0 == 0, pf, pf_rows); break;
        case 3: stream_tile<3, R>(a, lda, b + p, i0, i1, c, i0 == 0, pf, pf_rows); break;
        default: stream_tile<4, R>(a, lda, b + p, i0, i1, c, i0 == 0, pf, pf_rows); break;
      }
    }
  }
  if (kv == 0) std::fill_n(acc, R * n, stream_zero());
  for (index_t g = 0; g < groups; ++g) {
    const index_t p0 = group_start(g), size = group_start(g + 1) - p0;
    for (index_t r = 0; r < R; ++r)
      for (index_t q = 0; q < size; ++q) {
        float s = hsum(stream_fold(acc[p0 * R + r * size + q]));
        for (index_t j = kv; j < k; ++j) s += a[r * lda + j] * b[p0 + q][j];
        out[(p0 + q) * ldo + r] = s;
      }
  }
}

inline void stream_blocks(const float* a, index_t lda, index_t rows, const float* const* b, index_t n, index_t k, float* out, index_t ldo) {
  constexpr index_t rb = stream_block_rows;
  index_t r = 0;
  for (; r + rb <= rows; r += rb) stream_block<rb>(a + r * lda, lda, b, n, k, out + r, ldo, a + (r + rb) * lda, std::min(rb, rows - r - rb));
  switch (rows - r) {
    case 0: break;
    case 1: stream_block<1>(a + r * lda, lda, b, n, k, out + r, ldo, nullptr, 0); break;
    case 2: stream_block<2>(a + r * lda, lda, b, n, k, out + r, ldo, nullptr, 0); break;
    case 3: stream_block<3>(a + r * lda, lda, b, n, k, out + r, ldo, nullptr, 0); break;
    case 4: stream_block<4>(a + r * lda, lda, b, n, k, out + r, ldo, nullptr, 0); break;
    default: stream_block<5>(a + r * lda, lda, b, n, k, out + r, ldo, nullptr, 0); break;
  }
}
#endif

/// out[p, r] = Σ_i b[p][i]·a[r, i] for p < n ≤ stream_max_tokens, r < rows,
/// i < k; a and out row-major with the given leading dimensions.
inline void stream_product(const float* a, index_t lda, index_t rows, const float* const* b, index_t n, index_t k, float* out,
                           index_t ldo) {
#if defined(__AVX512F__)
  if (n > 2) return stream_blocks(a, lda, rows, b, n, k, out, ldo);
#endif
  // As many rows in flight as the accumulators of a token group leave
  // registers for: each row is one more sequential stream from memory.
  index_t r = 0;
  if (stream_lanes == 16 && n <= 2)
    for (; r + 8 <= rows; r += 8) stream_tokens<8>(a + r * lda, lda, b, n, k, out + r, ldo);
  if (n <= 2 || (stream_lanes == 16 && n <= 4))
    for (; r + 4 <= rows; r += 4) stream_tokens<4>(a + r * lda, lda, b, n, k, out + r, ldo);
  for (; r + 2 <= rows; r += 2) stream_tokens<2>(a + r * lda, lda, b, n, k, out + r, ldo);
  for (; r < rows; ++r) stream_tokens<1>(a + r * lda, lda, b, n, k, out + r, ldo);
}
#else
constexpr bool stream_kernel_available = false;
constexpr index_t stream_max_tokens = 48;
inline void stream_product(const float*, index_t, index_t, const float* const*, index_t, index_t, float*, index_t) {}
#endif

/// A row-major block of weight rows as panel_product takes it.
template <class Block>
inline weight_block rows_of(const Block& a) {
  return {a.data(), a.outerStride(), a.rows()};
}

/// [b·a₁ᵀ | b·a₂ᵀ | …] for row-major weight blocks of k columns each, where
/// row p of b (k values) is at b[p], p < m: streamed when b has few rows, else
/// the packed GEMM, which packs b once for all the blocks (Eigen's GEMM when
/// the CPU lacks AVX2/FMA).
inline matrix times_transpose(std::initializer_list<weight_block> a, const float* const* b, index_t m, index_t k) {
  index_t n = 0;
  for (const auto& blk : a) n += blk.rows;
  matrix out(m, n);
  if (m == 0 || n == 0) return out;
  if (stream_kernel_available && m > stream_max_tokens) {
    panel_product(a, b, m, k, out.data(), out.outerStride());
    return out;
  }
  if (!stream_kernel_available) {
    matrix bm(m, k);
    for (index_t p = 0; p < m; ++p) std::copy_n(b[p], k, bm.row(p).data());
    index_t col0 = 0;
    for (const auto& blk : a) {
      const Eigen::Map<const matrix, 0, Eigen::OuterStride<>> w(blk.data, blk.rows, k, Eigen::OuterStride<>(blk.ld));
      out.middleCols(col0, blk.rows).noalias() = bm * w.transpose();
      col0 += blk.rows;
    }
    return out;
  }
  index_t col0 = 0;
  for (const auto& blk : a) {
    stream_product(blk.data, blk.ld, blk.rows, b, m, k, out.data() + col0, out.outerStride());
    col0 += blk.rows;
  }
  return out;
}

/// The same with b a row-major matrix.
inline matrix times_transpose(std::initializer_list<weight_block> a, const_matrix_ref b) {
  std::vector<const float*> rows(static_cast<std::size_t>(b.rows()));
  for (index_t p = 0; p < b.rows(); ++p) rows[std::size_t(p)] = b.row(p).data();
  return times_transpose(a, rows.data(), b.rows(), b.cols());
}

}  // namespace moeforge::runtime::detail
