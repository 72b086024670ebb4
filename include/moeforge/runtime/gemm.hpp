// The packed GEMM (BLIS-style): weight rows in panels of NR rows laid out
// [k][NR], which the MR×NR register-blocked micro-kernel reads sequentially,
// KC deep so a weight micro-panel stays in L1. The panels are either built
// once (panel_matrix, runtime::prepare) and read in place, or packed per call
// from row-major weights. Token operands are read in place from their rows
// for few tokens, or packed into [k][MR] panels for many. Every output element
// is one FMA chain over k in ascending order, in a single lane, whichever
// operands were packed, however the tokens are grouped and whichever thread
// runs it: prepared and unpacked weights give bit-identical results.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <vector>

#include <Eigen/Core>

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

/// Token operand of the micro-kernel: a packed panel, value (r, k) at a[k·MR + r].
struct packed_tokens {
  const float* a;
  float operator()(index_t r, index_t k) const { return a[k * gemm_mr + r]; }
};
/// Token operand read in place: value (r, k) at row[r][k]; only the rows the tile computes are read.
struct token_rows {
  const float* const* row;
  float operator()(index_t r, index_t k) const { return row[r][k]; }
};

/// c[M×NR] (+)= Σ_k tokens(r, k)·b-panel[k][NR] over the first M ≤ MR token
/// rows (a last, partial panel computes only its real tokens, so the cost
/// follows the token count, not the panel count); c is a contiguous tile,
/// overwritten when `first`, else accumulated into. Each element's sum is the
/// same whatever M is and wherever the tokens are read from. `pf`, if not
/// null, is a panel slice the caller reads next: it is fetched into L2 at the
/// pace this one is read, so two weight streams are in flight, not one.
template <int M, class Tokens>
inline void micro_kernel_rows(index_t kl, Tokens a, const float* b, float* c, bool first, const float* pf = nullptr) {
#if defined(__AVX512F__)
  __m512 lo[M], hi[M];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) {
    lo[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + r * gemm_nr);
    hi[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + r * gemm_nr + 16);
  }
  for (index_t k = 0; k < kl; ++k, b += gemm_nr) {
    if (pf) _mm_prefetch(reinterpret_cast<const char*>(pf + k * gemm_nr), _MM_HINT_T1), _mm_prefetch(reinterpret_cast<const char*>(pf + k * gemm_nr + 16), _MM_HINT_T1);
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const __m512 x = _mm512_set1_ps(a(r, k));
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
  for (index_t k = 0; k < kl; ++k, b += gemm_nr) {
    if (pf) _mm_prefetch(reinterpret_cast<const char*>(pf + k * gemm_nr), _MM_HINT_T1);
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
    for (int r = 0; r < M; ++r) {
      const __m256 x = _mm256_set1_ps(a(r, k));
      lo[r] = _mm256_fmadd_ps(x, b0, lo[r]), hi[r] = _mm256_fmadd_ps(x, b1, hi[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) _mm256_storeu_ps(c + r * gemm_nr, lo[r]), _mm256_storeu_ps(c + r * gemm_nr + 8, hi[r]);
#else
  (void)pf;
  float acc[gemm_tile];
  for (index_t e = 0; e < M * gemm_nr; ++e) acc[e] = first ? 0.0f : c[e];
  for (index_t k = 0; k < kl; ++k, b += gemm_nr)
    for (index_t r = 0; r < M; ++r)
      for (index_t j = 0; j < gemm_nr; ++j) acc[r * gemm_nr + j] += a(r, k) * b[j];  // (std::fma is a library call without -mfma)
  for (index_t e = 0; e < M * gemm_nr; ++e) c[e] = acc[e];
#endif
}

/// micro_kernel_rows for the first `rows` (1..MR) token rows.
template <class Tokens>
inline void micro_kernel_tokens(index_t kl, Tokens a, const float* b, float* c, bool first, index_t rows = gemm_mr,
                                const float* pf = nullptr) {
  switch (rows) {
    case 1: return micro_kernel_rows<1>(kl, a, b, c, first, pf);
    case 2: return micro_kernel_rows<2>(kl, a, b, c, first, pf);
    case 3: return micro_kernel_rows<3>(kl, a, b, c, first, pf);
    case 4: return micro_kernel_rows<4>(kl, a, b, c, first, pf);
    case 5: return micro_kernel_rows<5>(kl, a, b, c, first, pf);
#if defined(__AVX512F__)
    case 6: return micro_kernel_rows<6>(kl, a, b, c, first, pf);
    case 7: return micro_kernel_rows<7>(kl, a, b, c, first, pf);
#endif
    default: return micro_kernel_rows<int(gemm_mr)>(kl, a, b, c, first, pf);
  }
}
/// The micro-kernel on a packed token panel a[k][MR].
inline void micro_kernel(index_t kl, const float* a, const float* b, float* c, bool first, index_t rows = gemm_mr) {
  micro_kernel_tokens(kl, packed_tokens{a}, b, c, first, rows);
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

struct weight_block;

/// Rows of a weight matrix in the micro-kernel's order, built once: panel p
/// holds rows [p·NR, p·NR + NR) as [depth][NR], rows past the end zero.
/// Panels restart at every cut (rows [cut_i, cut_i+1) start panel-aligned),
/// so a block that starts at a cut, such as a DualSparse expert's minor part,
/// reads whole panels. The storage type is the seam for other weight types:
/// a BF16 panel would hold pairs of k ([depth/2][NR][2]) for `vdpbf16ps`.
class panel_matrix {
 public:
  panel_matrix() = default;
  /// Packs `rows` rows of depth `depth` from src (row-major, leading dimension
  /// ld), with panels restarting at `cuts` (ascending, inside (0, rows)).
  panel_matrix(const float* src, index_t ld, index_t rows, index_t depth, const std::vector<index_t>& cuts = {})
      : rows_(rows), depth_(depth) {
    starts_.push_back(0);
    for (const index_t c : cuts)
      if (c > starts_.back() && c < rows) starts_.push_back(c);
    index_t panels = 0;
    for (std::size_t s = 0; s < starts_.size(); ++s) first_panel_.push_back(panels), panels += ceil_panels(segment_end(s) - starts_[s]);
    data_.resize(std::size_t(panels * depth * gemm_nr));
    for (std::size_t s = 0; s < starts_.size(); ++s)
      for (index_t r = starts_[s]; r < segment_end(s); r += gemm_nr)
        pack_rows<gemm_nr>(src + r * ld, ld, std::min(gemm_nr, segment_end(s) - r), depth,
                           data_.data() + (first_panel_[s] + (r - starts_[s]) / gemm_nr) * depth * gemm_nr);
  }

  index_t rows() const { return rows_; }
  index_t depth() const { return depth_; }
  static index_t ceil_panels(index_t rows) { return (rows + gemm_nr - 1) / gemm_nr; }
  /// The first row at or after `row` where panels restart (rows() if none).
  index_t next_cut(index_t row) const {
    const auto it = std::upper_bound(starts_.begin(), starts_.end(), row);
    return it == starts_.end() ? rows_ : *it;
  }
  /// Rows [row0, row0 + rows) at depth [k0, …) as an operand of panel_product;
  /// the rows must not cross a cut.
  weight_block block(index_t row0, index_t rows, index_t k0) const;
  /// Panel p's values at depth k: [NR] for k, k + 1, …
  const float* at(index_t panel, index_t k) const { return data_.data() + (panel * depth_ + k) * gemm_nr; }
  /// The panel holding `row`, and the row's place in it.
  std::pair<index_t, index_t> locate(index_t row) const {
    const std::size_t s = std::size_t(std::upper_bound(starts_.begin(), starts_.end(), row) - starts_.begin()) - 1;
    return {first_panel_[s] + (row - starts_[s]) / gemm_nr, (row - starts_[s]) % gemm_nr};
  }

 private:
  index_t segment_end(std::size_t s) const { return s + 1 < starts_.size() ? starts_[s + 1] : rows_; }
  index_t rows_ = 0, depth_ = 0;
  std::vector<index_t> starts_, first_panel_;
  std::vector<float, Eigen::aligned_allocator<float>> data_;
};

/// A block of weight rows, the `a` operand of panel_product: row-major
/// (data, ld; packed into panels per call), or rows of a panel_matrix read in
/// place (its panels from panel0, depth from k0, the first `skip` rows of
/// panel0 not part of the block).
struct weight_block {
  const float* data = nullptr;
  index_t ld = 0, rows = 0;
  const panel_matrix* panels = nullptr;
  index_t panel0 = 0, k0 = 0, skip = 0;

  index_t panel_count() const { return panel_matrix::ceil_panels(skip + rows); }
  /// Panel p's depth slice [k, k + kl) in the micro-kernel's order: in place
  /// when prepared, else packed into buf (kl·NR floats).
  const float* slice(index_t p, index_t k, index_t kl, float* buf) const {
    if (panels) return panels->at(panel0 + p, k0 + k);
    pack_rows<gemm_nr>(data + p * gemm_nr * ld + k, ld, std::min(gemm_nr, rows - p * gemm_nr), kl, buf);
    return buf;
  }
};

inline weight_block panel_matrix::block(index_t row0, index_t rows, index_t k0) const {
  const auto [panel, skip] = locate(row0);
  return {nullptr, 0, rows, this, panel, k0, skip};
}

/// Up to this many tokens the micro-kernel reads them in place from their
/// rows; more are packed into [k][MR] panels once per depth block, which
/// keeps a block of MC panels contiguous in L2 while every weight panel
/// passes over it. (The choice changes no result.)
constexpr index_t gemm_tokens_in_place = 32;

/// out[t, c] = Σ_k b[t][k]·a[c, k] for t < m tokens, where the columns c run
/// over the rows of every block of `a` in turn (so gate and up rows give
/// [x·gateᵀ | x·upᵀ] with the tokens read once). Token t's k values are at
/// b[t]; out is row-major with leading dimension ldo; k is every block's
/// depth. Single-threaded: callers run it inside their own parallel tasks.
inline void panel_product(std::initializer_list<weight_block> a, const float* const* b, index_t m, index_t k, float* out, index_t ldo) {
  index_t npanels = 0, packed_panels = 0, n = 0;
  for (const auto& blk : a) {
    npanels += blk.panel_count(), n += blk.rows;
    if (!blk.panels) packed_panels += blk.panel_count();
  }
  if (k == 0) {
    for (index_t t = 0; t < m; ++t) std::fill_n(out + t * ldo, n, 0.0f);
    return;
  }
  thread_local std::vector<float> apack, bpack, tiles;
  thread_local std::vector<const float*> slices;
  thread_local std::vector<char> prepared;
  const index_t mpanels = (m + gemm_mr - 1) / gemm_mr;
  const bool pack_tokens = m > gemm_tokens_in_place;
  apack.resize(std::size_t(packed_panels * gemm_nr * gemm_kc));
  if (pack_tokens) bpack.resize(std::size_t(gemm_mc * gemm_mr * gemm_kc));
  tiles.resize(std::size_t(mpanels * npanels * gemm_tile));
  slices.resize(std::size_t(npanels));
  prepared.clear();
  for (const auto& blk : a) prepared.insert(prepared.end(), std::size_t(blk.panel_count()), blk.panels != nullptr);
  for (index_t k0 = 0; k0 < k; k0 += gemm_kc) {
    const index_t kl = std::min(gemm_kc, k - k0);
    float* dst = apack.data();
    index_t jp = 0;
    for (const auto& blk : a)
      for (index_t p = 0; p < blk.panel_count(); ++p, ++jp) {
        slices[std::size_t(jp)] = blk.slice(p, k0, kl, dst);
        if (!blk.panels) dst += kl * gemm_nr;
      }
    for (index_t ic = 0; ic < mpanels; ic += gemm_mc) {
      const index_t iend = std::min(mpanels, ic + gemm_mc);
      if (pack_tokens) pack_panels<gemm_mr>(b + ic * gemm_mr, std::min(m - ic * gemm_mr, (iend - ic) * gemm_mr), k0, kl, bpack.data());
      for (jp = 0; jp < npanels; ++jp) {
        // Prepared slices come from memory: the first token group fetches the next one.
        const float* next = jp + 1 < npanels && ic == 0 && prepared[std::size_t(jp + 1)] ? slices[std::size_t(jp + 1)] : nullptr;
        for (index_t ip = ic; ip < iend; ++ip) {
          float* tile = tiles.data() + (ip * npanels + jp) * gemm_tile;
          const index_t rows = std::min(gemm_mr, m - ip * gemm_mr);
          const float* pf = ip == ic ? next : nullptr;
          if (pack_tokens) {
            micro_kernel_tokens(kl, packed_tokens{bpack.data() + (ip - ic) * kl * gemm_mr}, slices[std::size_t(jp)], tile, k0 == 0, rows, pf);
          } else {
            const float* row[gemm_mr];
            for (index_t r = 0; r < rows; ++r) row[r] = b[ip * gemm_mr + r] + k0;
            micro_kernel_tokens(kl, token_rows{row}, slices[std::size_t(jp)], tile, k0 == 0, rows, pf);
          }
        }
      }
    }
  }
  index_t panel0 = 0, col0 = 0;
  for (const auto& blk : a) {
    for (index_t t = 0; t < m; ++t) {
      const float* tile_row = tiles.data() + ((t / gemm_mr) * npanels + panel0) * gemm_tile + (t % gemm_mr) * gemm_nr;
      for (index_t c = 0; c < blk.rows;) {
        const index_t q = blk.skip + c, run = std::min(gemm_nr - q % gemm_nr, blk.rows - c);
        std::copy_n(tile_row + q / gemm_nr * gemm_tile + q % gemm_nr, run, out + t * ldo + col0 + c);
        c += run;
      }
    }
    panel0 += blk.panel_count(), col0 += blk.rows;
  }
}

}  // namespace moeforge::runtime::detail
