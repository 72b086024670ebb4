// The packed GEMM for blocks of many tokens (BLIS-style): both operands are
// copied into panels that the MR×NR register-blocked micro-kernel reads
// sequentially, KC deep so a weight micro-panel stays in L1 and a block of
// token panels in L2. Every output element is summed over k in ascending
// order, KC at a time; the arithmetic depends only on the shapes, never on the
// thread that runs it.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "moeforge/core/tensor.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace moeforge::runtime::detail {

// Micro-tile: MR tokens × NR weight rows (output columns). With AVX-512, 8×32
// (16 zmm accumulators, two weight vectors per broadcast) reaches 95% of one
// Zen 5 core's FMA peak in L1, where 12×16 (one load per FMA) stops at 80%.
#if defined(__AVX512F__)
constexpr index_t gemm_mr = 8;
constexpr index_t gemm_nr = 32;
#else
constexpr index_t gemm_mr = 6;  // 12 ymm accumulators
constexpr index_t gemm_nr = 16;
#endif
constexpr index_t gemm_kc = 256;  // depth of a packed block (weight micro-panel: 16 or 32 KiB, L1)
constexpr index_t gemm_mc = 16;   // token panels per packed token block (96 or 128 tokens × KC, L2)
constexpr index_t gemm_tile = gemm_mr * gemm_nr;

/// c[M×NR] (+)= a-panel[kl][MR]ᵀ · b-panel[kl][NR] over the first M ≤ MR
/// token rows of the panel (a last, partial panel computes only its real
/// tokens, so the cost follows the token count, not the panel count); c is a
/// contiguous tile, overwritten when `first`, else accumulated into. Each
/// element's sum is the same whatever M is.
template <int M>
inline void micro_kernel_rows(index_t kl, const float* a, const float* b, float* c, bool first) {
#if defined(__AVX512F__)
  __m512 lo[M], hi[M];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) {
    lo[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + r * gemm_nr);
    hi[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + r * gemm_nr + 16);
  }
  for (index_t k = 0; k < kl; ++k, a += gemm_mr, b += gemm_nr) {
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const __m512 x = _mm512_set1_ps(a[r]);
      lo[r] = _mm512_fmadd_ps(x, b0, lo[r]), hi[r] = _mm512_fmadd_ps(x, b1, hi[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) _mm512_storeu_ps(c + r * gemm_nr, lo[r]), _mm512_storeu_ps(c + r * gemm_nr + 16, hi[r]);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 lo[M], hi[M];  // 12 accumulators at M = 6, with two weight vectors and a broadcast: 15 of 16 registers
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) {
    lo[r] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * gemm_nr);
    hi[r] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * gemm_nr + 8);
  }
  for (index_t k = 0; k < kl; ++k, a += gemm_mr, b += gemm_nr) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
    for (int r = 0; r < M; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r);
      lo[r] = _mm256_fmadd_ps(x, b0, lo[r]), hi[r] = _mm256_fmadd_ps(x, b1, hi[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) _mm256_storeu_ps(c + r * gemm_nr, lo[r]), _mm256_storeu_ps(c + r * gemm_nr + 8, hi[r]);
#else
  float acc[gemm_tile];
  for (index_t e = 0; e < M * gemm_nr; ++e) acc[e] = first ? 0.0f : c[e];
  for (index_t k = 0; k < kl; ++k, a += gemm_mr, b += gemm_nr)
    for (index_t r = 0; r < M; ++r)
      for (index_t j = 0; j < gemm_nr; ++j) acc[r * gemm_nr + j] += a[r] * b[j];  // (std::fma is a library call without -mfma)
  for (index_t e = 0; e < M * gemm_nr; ++e) c[e] = acc[e];
#endif
}

/// micro_kernel_rows for the first `rows` (1..MR) token rows of the panel.
inline void micro_kernel(index_t kl, const float* a, const float* b, float* c, bool first, index_t rows = gemm_mr) {
  switch (rows) {
    case 1: return micro_kernel_rows<1>(kl, a, b, c, first);
    case 2: return micro_kernel_rows<2>(kl, a, b, c, first);
    case 3: return micro_kernel_rows<3>(kl, a, b, c, first);
    case 4: return micro_kernel_rows<4>(kl, a, b, c, first);
    case 5: return micro_kernel_rows<5>(kl, a, b, c, first);
#if defined(__AVX512F__)
    case 6: return micro_kernel_rows<6>(kl, a, b, c, first);
    case 7: return micro_kernel_rows<7>(kl, a, b, c, first);
#endif
    default: return micro_kernel_rows<int(gemm_mr)>(kl, a, b, c, first);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
/// dst[j*ld + q] = row(q)[j] for q, j < 8: an 8×8 transpose in registers.
template <class Row>
inline void transpose8x8_of(Row row, float* dst, index_t ld) {
  __m256 r[8], t[8];
  for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(row(q));
  for (int q = 0; q < 8; q += 2) t[q] = _mm256_unpacklo_ps(r[q], r[q + 1]), t[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
  // r[0..3]: columns 0..3 of rows 0-3 | columns 4..7 of rows 0-3; r[4..7] the same for rows 4-7.
  for (int h = 0; h < 8; h += 4) {
    r[h + 0] = _mm256_shuffle_ps(t[h + 0], t[h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[h + 1] = _mm256_shuffle_ps(t[h + 0], t[h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * ld, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
    _mm256_storeu_ps(dst + (j + 4) * ld, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
  }
}
inline void transpose8x8(const float* const* row, float* dst, index_t ld) {
  transpose8x8_of([row](int q) { return row[q]; }, dst, ld);
}
#endif

/// One panel: dst[k*width + q] = row[q][k] for k < kl, q < width. Groups of 8
/// rows are transposed 8 columns at a time in registers; writes are sequential.
template <index_t width>
inline void pack_panel(const float* const* row, index_t kl, float* dst) {
  index_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
  constexpr index_t grouped = width / 8 * 8;
  for (; k + 8 <= kl; k += 8) {
    const float* group[8];
    for (index_t q0 = 0; q0 < grouped; q0 += 8) {
      for (index_t q = 0; q < 8; ++q) group[q] = row[q0 + q] + k;
      transpose8x8(group, dst + k * width + q0, width);
    }
    for (index_t j = k; j < k + 8; ++j)
      for (index_t q = grouped; q < width; ++q) dst[j * width + q] = row[q][j];
  }
#endif
  for (; k < kl; ++k)
    for (index_t q = 0; q < width; ++q) dst[k * width + q] = row[q][k];
}

/// Zeros standing in for the missing rows of a last, partial panel.
inline const float* zero_row() {
  static const float zeros[gemm_kc] = {};
  return zeros;
}

/// One panel of `rows` ≤ width consecutive rows of src (leading dimension
/// ld), k < kl: dst[k*width + q] = src[q*ld + k], zero for q ≥ rows. Eight rows
/// at a time along the whole depth: eight sequential streams whose cache lines
/// are used up before the next eight rows start. (Going across all the rows at
/// each k keeps 32 lines of one L1 set alive when rows are a multiple of 4 KiB
/// apart, as at H = 2048, and packs a third slower from L2.)
template <index_t width>
inline void pack_rows(const float* src, index_t ld, index_t rows, index_t kl, float* dst) {
  index_t q0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const index_t k8 = kl / 8 * 8;
  for (; q0 + 8 <= rows; q0 += 8) {
    const float* s = src + q0 * ld;
    for (index_t k = 0; k < k8; k += 8) transpose8x8_of([s, ld, k](int q) { return s + q * ld + k; }, dst + k * width + q0, width);
    for (index_t k = k8; k < kl; ++k)
      for (index_t q = 0; q < 8; ++q) dst[k * width + q0 + q] = s[q * ld + k];
  }
#endif
  for (index_t k = 0; k < kl; ++k) {
    for (index_t q = q0; q < rows; ++q) dst[k * width + q] = src[q * ld + k];
    for (index_t q = std::max(q0, rows); q < width; ++q) dst[k * width + q] = 0.0f;
  }
}

/// Copies `count` rows of src (row-major, leading dimension ld), columns
/// [k0, k0+kl), into panels of `width` rows laid out [panel][k][width]; rows
/// past `count` in the last panel are zero.
template <index_t width>
inline void pack_panels(const float* src, index_t ld, index_t count, index_t k0, index_t kl, float* dst) {
  for (index_t p0 = 0; p0 < count; p0 += width, dst += kl * width)
    pack_rows<width>(src + p0 * ld + k0, ld, std::min(width, count - p0), kl, dst);
}

/// The same for `count` rows given by pointers (token rows that were never gathered).
template <index_t width>
inline void pack_panels(const float* const* src, index_t count, index_t k0, index_t kl, float* dst) {
  const float* row[width];
  for (index_t p0 = 0; p0 < count; p0 += width, dst += kl * width) {
    for (index_t q = 0; q < width; ++q) row[q] = p0 + q < count ? src[p0 + q] + k0 : zero_row();
    pack_panel<width>(row, kl, dst);
  }
}

/// A block of weight rows, row-major: the `a` operand of packed_product.
struct weight_rows {
  const float* data;
  index_t ld, rows;
};

/// out[t, c] = Σ_k b[t][k]·a[c, k] for t < m tokens, where the columns c run
/// over the rows of every block of `a` in turn (so gate and up rows give
/// [x·gateᵀ | x·upᵀ] with the tokens packed once). Token t's k values are at
/// b[t]; a and out are row-major with the given leading dimensions; k is every
/// block's column count. Single-threaded: callers run it inside their own
/// parallel tasks.
inline void packed_product(std::initializer_list<weight_rows> a, const float* const* b, index_t m, index_t k, float* out, index_t ldo) {
  index_t npanels = 0, n = 0;
  for (const auto& blk : a) npanels += (blk.rows + gemm_nr - 1) / gemm_nr, n += blk.rows;
  if (k == 0) {
    for (index_t t = 0; t < m; ++t) std::fill_n(out + t * ldo, n, 0.0f);
    return;
  }
  thread_local std::vector<float> apack, bpack, tiles;
  const index_t mpanels = (m + gemm_mr - 1) / gemm_mr;
  apack.resize(std::size_t(npanels * gemm_nr * gemm_kc));
  bpack.resize(std::size_t(gemm_mc * gemm_mr * gemm_kc));
  tiles.resize(std::size_t(mpanels * npanels * gemm_tile));
  for (index_t k0 = 0; k0 < k; k0 += gemm_kc) {
    const index_t kl = std::min(gemm_kc, k - k0);
    float* dst = apack.data();
    for (const auto& blk : a) {
      pack_panels<gemm_nr>(blk.data, blk.ld, blk.rows, k0, kl, dst);
      dst += (blk.rows + gemm_nr - 1) / gemm_nr * gemm_nr * kl;
    }
    for (index_t ic = 0; ic < mpanels; ic += gemm_mc) {
      const index_t iend = std::min(mpanels, ic + gemm_mc);
      pack_panels<gemm_mr>(b + ic * gemm_mr, std::min(m - ic * gemm_mr, (iend - ic) * gemm_mr), k0, kl, bpack.data());
      for (index_t jp = 0; jp < npanels; ++jp)
        for (index_t ip = ic; ip < iend; ++ip)
          micro_kernel(kl, bpack.data() + (ip - ic) * kl * gemm_mr, apack.data() + jp * kl * gemm_nr,
                       tiles.data() + (ip * npanels + jp) * gemm_tile, k0 == 0, std::min(gemm_mr, m - ip * gemm_mr));
    }
  }
  index_t panel0 = 0, col0 = 0;
  for (const auto& blk : a) {
    for (index_t t = 0; t < m; ++t) {
      const float* tile_row = tiles.data() + (((t / gemm_mr) * npanels + panel0) * gemm_tile + (t % gemm_mr) * gemm_nr);
      for (index_t r = 0; r < blk.rows; r += gemm_nr)
        std::copy_n(tile_row + r / gemm_nr * gemm_tile, std::min(gemm_nr, blk.rows - r), out + t * ldo + col0 + r);
    }
    panel0 += (blk.rows + gemm_nr - 1) / gemm_nr, col0 += blk.rows;
  }
}

}  // namespace moeforge::runtime::detail
