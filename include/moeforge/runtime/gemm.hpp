// The packed GEMM (BLIS-style): weight rows in panels of NR rows laid out
// [k][NR], which the MR×NR register-blocked micro-kernel reads sequentially,
// KC deep, a weight micro-panel staying in L1 or L2 while every token panel of
// a block passes over it (whole, when one token panel's worth reads prepared
// panels and nothing is reused). The panels are either built
// once (panel_matrix, runtime::prepare) and read in place, or packed per call
// from row-major weights. Token operands are read in place from their rows
// for few tokens, or packed into [k][MR] panels for many. Every output element
// is one FMA chain over k in ascending order, in a single lane, whichever
// operands were packed, however the tokens are grouped and whichever thread
// runs it: prepared and unpacked weights give bit-identical results.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "moeforge/core/tensor.hpp"
#include "moeforge/core/memory.hpp"
#include "moeforge/detail/mul_add.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
// The AVX-512 paths use AVX512BW's 16-bit unpacks and packs beside
// AVX512F's arithmetic (every AVX-512 CPU since Skylake-SP has both); a
// target with AVX512F alone runs the AVX2 paths.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define MOEFORGE_GEMM_AVX512 1
#endif

namespace moeforge::runtime::detail {

// Micro-tile: MR tokens × NR weight rows (output columns). With AVX-512, 8×32
// (16 zmm accumulators, two weight vectors per broadcast) reaches 95% of one
// Zen 5 core's FMA peak in L1, where 12×16 (one load per FMA) stops at 80%.
#if defined(MOEFORGE_GEMM_AVX512)
constexpr index_t gemm_mr = 8;
constexpr index_t gemm_nr = 32;
#else
constexpr index_t gemm_mr = 6;  // 12 ymm accumulators
constexpr index_t gemm_nr = 16;
#endif
/// Depth of a product's blocks: each token panel's call to the micro-kernel
/// runs KC steps over one weight slice (F32: KC × NR × 4 bytes). With
/// AVX-512, 1024 (slices of 128 KiB F32, 64 KiB BF16: L2, not L1): a call's
/// work beside its loop (its tile's loads and stores, the next slices'
/// fetch shares, picking its micro-kernel) comes a quarter as often as in
/// 256-deep blocks, and L2 keeps the FMA pipes fed as well. Two builds
/// alternated in one process (both orders, identical outputs): 1024 against
/// 256 made a dense H 2048 × I 5632 FFN at 512 tokens 5-7% faster (F32)
/// and 9% (BF16), at 128 tokens 5% and 12%; E8A2 at 512 tokens 2-4% (F32)
/// and 5-7% (BF16), S1A1E8 and S3A3E8 (BF16) 3-6%, DeepSeek-V2-Lite (BF16)
/// 9%; at 64 tokens S1A1E8 and S3A3E8 3-5%, Qwen3-30B-A3B unchanged,
/// DeepSeek-V2-Lite (F32) 3% slower. 512 gained 2-4% less than 1024, the
/// whole depth (2048) no more. (AVX2 keeps 256: it targets CPUs with half
/// these caches, where it has not been measured; an AVX2 build on this Zen 5
/// gained as much or more from 1024.) Few-token products over prepared
/// panels read each panel's whole depth at once instead.
#if defined(MOEFORGE_GEMM_AVX512)
constexpr index_t gemm_kc = 1024;
#else
constexpr index_t gemm_kc = 256;
#endif
constexpr index_t gemm_mc = 16;  // token panels per packed token block (96 or 128 tokens × KC, L2; 8 gained nothing with KC 1024)
/// Depth of the blocks panel_matrix packs weights in (through a buffer on
/// the stack) and the CMoE markers multiply in (calib/markers.hpp).
constexpr index_t pack_kc = 256;
static_assert(pack_kc <= gemm_kc, "zero_row() serves both");
constexpr index_t gemm_tile = gemm_mr * gemm_nr;
/// Up to this many panels are read at once for one token (see
/// panels_together).
constexpr index_t gemm_max_together = 4;

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

// Weight panels hold F32 or BF16 values. A BF16 panel row (NR values at one
// depth k) is stored with its rows permuted within 128-bit lanes (see
// bf16_slot) so that interleaving it with zeros, 16 bits at a time, yields
// rows [0, NR/2) and [NR/2, NR) as F32 vectors: one load and two shuffles
// widen a whole row, exactly, so a BF16 panel computes what an F32 panel of
// the same values would, bit for bit, with half the bytes to stream. The
// same interleave of two depths gives the (k, k+1) pairs `vdpbf16ps` takes.

/// Where row q of a BF16 panel row is stored: 128-bit lanes of 8 values, the
/// first four of lane L holding rows 4L..4L+3, the last four rows NR/2 + 4L...
/// (`nr`: the panel width, this build's or another's whose panels are read.)
constexpr index_t bf16_slot(index_t q, index_t nr = gemm_nr) {
  const index_t half = q / (nr / 2), r = q % (nr / 2);
  return (r / 4) * 8 + half * 4 + r % 4;
}
/// The row stored in slot p (the inverse of bf16_slot).
constexpr index_t bf16_row(index_t p) { return (p % 8 < 4 ? 0 : gemm_nr / 2) + (p / 8) * 4 + p % 4; }

inline float widen(bfloat16 v) { return bf16_to_f32(v.bits); }
/// Row q's value in a panel row of either type.
inline float panel_value(const float* row, index_t q) { return row[q]; }
inline float panel_value(const bfloat16* row, index_t q) { return widen(row[bf16_slot(q)]); }

#if defined(MOEFORGE_GEMM_AVX512)
/// Rows [0, 16) and [16, 32) of a panel row as F32 vectors.
inline void load_panel_row(const float* p, __m512& lo, __m512& hi) { lo = _mm512_loadu_ps(p), hi = _mm512_loadu_ps(p + 16); }
inline void load_panel_row(const bfloat16* p, __m512& lo, __m512& hi) {
  const __m512i v = _mm512_loadu_si512(p), zero = _mm512_setzero_si512();
  lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v)), hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v));
}
#elif defined(__AVX2__) && defined(__FMA__)
/// Rows [0, 8) and [8, 16) of a panel row as F32 vectors.
inline void load_panel_row(const float* p, __m256& lo, __m256& hi) { lo = _mm256_loadu_ps(p), hi = _mm256_loadu_ps(p + 8); }
inline void load_panel_row(const bfloat16* p, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), zero = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
}
#endif
/// What a micro-kernel call fetches besides what it reads. Part of the next
/// panel slices to bring into L2 while it reads its own (one per panel it
/// reads, at most two): from `from[i]`, `pace[i]` 256ths of a byte further at
/// every depth step. One call reading a slice fetches a whole slice row a
/// step; when n token panels read it in turn, each fetches its n-th of the
/// next slice, so the weight stream keeps flowing through all of them, not
/// only the first. And, when `own_ahead`, its own slices' rows a little ahead
/// into L1 (fetch_panels_ahead): set for the first call to read them, the
/// one that takes them from L2 or memory.
struct fetch_share {
  const char* from[2] = {nullptr, nullptr};  ///< the first null ends the list
  std::size_t pace[2] = {0, 0};
  bool own_ahead = false;
};

/// Fetches one region's lines for depth step k into L2.
inline void fetch_region(const char* from, std::size_t pace, index_t k) {
#if defined(__AVX2__) && defined(__FMA__)
  const char* p = from + ((std::size_t(k) * pace) >> 8);
  _mm_prefetch(p, _MM_HINT_T1);
  if (pace > (std::size_t(64) << 8)) _mm_prefetch(p + 64, _MM_HINT_T1);  // (at most two lines: a row is ≤ 128 bytes)
#else
  (void)from, (void)pace, (void)k;
#endif
}

/// Fetches the share's lines for depth step k into L2 (none if it is
/// empty), for a call over P panels (a second region only then: a loop over
/// both in one panel's calls cost BF16 products of 16 tokens 3-7%).
template <int P>
inline void fetch_ahead(const fetch_share& f, index_t k) {
  if (!f.from[0]) return;
  fetch_region(f.from[0], f.pace[0], k);
  if (P > 1 && f.from[1]) fetch_region(f.from[1], f.pace[1], k);
}

/// How far ahead of its reads the first call reading a slice fetches the
/// slice's rows into L1 (fetch_share::own_ahead), shared among the panels it
/// reads side by side: 2 KiB each of four panels (one token), 4 KiB each of
/// two (a few tokens), 8 KiB of one (a panel of 7 or 8). The hardware
/// prefetcher follows those sequential streams, but not far enough ahead to
/// keep a core's share of DRAM in flight, nor to hide L2's latency from the
/// calls with many tokens that are bound by their multiply-adds: an E8A2
/// layer of BF16 experts decoded one token 5-15% faster with 2 KiB a panel
/// (F32 3-5%; A/B in one process, Zen 5), near the time of a plain read of
/// the same bytes, and 10-15% in an AVX2 build on the same CPU (1 and 4 KiB
/// gained less). Beyond one token, fetching 2 KiB a panel made E8A2 BF16 at
/// 64 tokens 10-12% faster, DeepSeek-V2-Lite 6-10%, Qwen3-30B-A3B 7% (AVX2
/// build 11%), F32 2-6%, a dense BF16 FFN at 8 tokens 4-6%. 8 KiB a call
/// instead of 2 KiB a panel then made E8A2 BF16 at 64 tokens (experts of 16
/// tokens, one panel at a time) another 10% faster, the dense BF16 FFN at 8
/// tokens 2-5%, DeepSeek-V2-Lite 2-3%, the rest unchanged (two builds
/// alternated); 16 and 32 KiB a panel lost again. Every call fetching, not
/// only the first reader, gained no more (the later token panels find the
/// slice in L1).
constexpr std::size_t own_bytes_ahead = 8192;
/// ... except one token's BF16 panels with AVX-512, the four side by side
/// 1 KiB ahead each (16 rows, as F32's 2 KiB): a dense BF16 FFN and E8A2's
/// BF16 layer decoded one token 2-7% faster so (medians of 150-400 calls,
/// rotating copies, A/B in one process, six runs), where the AVX2 build,
/// whose BF16 rows are half a line, lost 2-6%.
#if defined(MOEFORGE_GEMM_AVX512)
constexpr std::size_t own_bf16_token_bytes_ahead = own_bytes_ahead / 2;
#else
constexpr std::size_t own_bf16_token_bytes_ahead = own_bytes_ahead;
#endif

/// Fetches each of P panels of W, own_bytes_ahead / P bytes past row k
/// (one token's BF16 panels: own_bf16_token_bytes_ahead / P), into L1.
template <int P, class W>
inline void fetch_panels_ahead(const W* const* b, index_t k) {
#if defined(__AVX2__) && defined(__FMA__)
  constexpr bool bf16_token = P == gemm_max_together && std::is_same_v<W, bfloat16>;
  constexpr std::size_t lead = (bf16_token ? own_bf16_token_bytes_ahead : own_bytes_ahead) / P;
  for (int p = 0; p < P; ++p) {
    // As an address, not a pointer: near a panel's end it lies past the storage (a prefetch never faults).
    const std::uintptr_t row = reinterpret_cast<std::uintptr_t>(b[p] + k * gemm_nr) + lead;
    _mm_prefetch(reinterpret_cast<const char*>(row), _MM_HINT_T0);
    if constexpr (sizeof(W) * gemm_nr > 64) _mm_prefetch(reinterpret_cast<const char*>(row + 64), _MM_HINT_T0);  // (a row is at most two lines)
  }
#else
  (void)b, (void)k;
#endif
}

/// c[M×NR] (+)= Σ_k tokens(r, k)·b-panel[k][NR] over the first M ≤ MR token
/// rows (a last, partial panel computes only its real tokens, so the cost
/// follows the token count, not the panel count), for each of P panels b[p]
/// into its own tile c + p·MR·NR; a tile is contiguous, overwritten when
/// `first`, else accumulated into. Each element's sum is the same whatever M
/// and P are and wherever the tokens are read from. `pf` is a share of the
/// panel slices the caller reads next, fetched into L2 at the pace these
/// are read, so the next weights stream in beside the ones in use, and
/// whether to fetch these slices' own rows ahead (fetch_share). W is the
/// panel's value type (float or bfloat16).
template <int M, int P, class Tokens, class W>
inline void micro_kernel_rows(index_t kl, Tokens a, const W* const* b, float* c, bool first, const fetch_share& pf) {
#if defined(MOEFORGE_GEMM_AVX512)
  __m512 lo[M][P], hi[M][P];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      lo[r][p] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + p * gemm_tile + r * gemm_nr);
      hi[r][p] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + p * gemm_tile + r * gemm_nr + 16);
    }
  for (index_t k = 0; k < kl; ++k) {
    fetch_ahead<P>(pf, k);
    if (pf.own_ahead) fetch_panels_ahead<P>(b, k);
    __m512 b0[P], b1[P];
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) load_panel_row(b[p] + k * gemm_nr, b0[p], b1[p]);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const __m512 x = _mm512_set1_ps(a(r, k));
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) lo[r][p] = _mm512_fmadd_ps(x, b0[p], lo[r][p]), hi[r][p] = _mm512_fmadd_ps(x, b1[p], hi[r][p]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p)
      _mm512_storeu_ps(c + p * gemm_tile + r * gemm_nr, lo[r][p]), _mm512_storeu_ps(c + p * gemm_tile + r * gemm_nr + 16, hi[r][p]);
#elif defined(__AVX2__) && defined(__FMA__)
  // 2·M·P accumulators: 12 at M = 6 (P = 1), with two weight vectors and a
  // broadcast 15 of 16 registers; 8 for panels side by side (M·P <= 4).
  __m256 lo[M][P], hi[M][P];
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      lo[r][p] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + p * gemm_tile + r * gemm_nr);
      hi[r][p] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + p * gemm_tile + r * gemm_nr + 8);
    }
  for (index_t k = 0; k < kl; ++k) {
    fetch_ahead<P>(pf, k);
    if (pf.own_ahead) fetch_panels_ahead<P>(b, k);
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      __m256 b0, b1;
      load_panel_row(b[p] + k * gemm_nr, b0, b1);
#pragma GCC unroll 6
      for (int r = 0; r < M; ++r) {
        const __m256 x = _mm256_set1_ps(a(r, k));
        lo[r][p] = _mm256_fmadd_ps(x, b0, lo[r][p]), hi[r][p] = _mm256_fmadd_ps(x, b1, hi[r][p]);
      }
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p)
      _mm256_storeu_ps(c + p * gemm_tile + r * gemm_nr, lo[r][p]), _mm256_storeu_ps(c + p * gemm_tile + r * gemm_nr + 8, hi[r][p]);
#else
  (void)pf;
  for (int p = 0; p < P; ++p) {
    float* tile = c + p * gemm_tile;
    float acc[gemm_tile];
    for (index_t e = 0; e < M * gemm_nr; ++e) acc[e] = first ? 0.0f : tile[e];
    for (index_t k = 0; k < kl; ++k)
      for (index_t r = 0; r < M; ++r)
        for (index_t j = 0; j < gemm_nr; ++j) {
          float& sum = acc[r * gemm_nr + j];
          sum = moeforge::detail::mul_add(a(r, k), panel_value(b[p] + k * gemm_nr, j), sum);
        }
    for (index_t e = 0; e < M * gemm_nr; ++e) tile[e] = acc[e];
  }
#endif
}

/// Calls kernel(std::integral_constant<int, M>{}) with M = rows for rows in
/// 1..Max (Max beyond): a micro-kernel unrolled over its token rows, picked
/// at run time for the last, partial block.
template <int Max, class Kernel>
inline void with_rows(index_t rows, Kernel&& kernel) {
  if constexpr (Max > 1)
    if (rows < Max) return with_rows<Max - 1>(rows, kernel);
  kernel(std::integral_constant<int, Max>{});
}

/// Up to this many tokens read in place take two panels side by side: as
/// many as keep the accumulators (2 per token and panel) and both panels'
/// weight vectors in registers: 6 with AVX-512's 32, 2 with AVX2's 16.
#if defined(MOEFORGE_GEMM_AVX512)
constexpr index_t gemm_pair_rows = 6;
#else
constexpr index_t gemm_pair_rows = 2;
#endif
/// Panels one micro-kernel call reads side by side for `rows` tokens read in
/// place. One token gives a panel two FMA chains, which wait on the FMA's
/// latency: one panel at a time, a BF16 panel streamed from L3 at about 49
/// GB/s a core (57 GFLOP/s), which left too little slack over the 29 GB/s a
/// core DRAM can deliver for the misses; four panels side by side keep eight
/// chains busy (92 GFLOP/s). A few tokens are bound by the weights' bytes
/// too, and two sequential streams keep more of them in flight than one: F32
/// experts of 64 × 1408 at 4 and 6 tokens each (T = 64, 2 threads) ran in
/// 35.5 and 38.6 ms where one panel at a time took 39.0 and 41.0.
constexpr index_t panels_together(index_t rows) { return rows == 1 ? gemm_max_together : rows <= gemm_pair_rows ? 2 : 1; }

/// How a product cuts its m tokens into panels of at most MR: whole panels
/// of MR in order, except that where the last would be short and it and the
/// one before fit two panels of at most gemm_pair_rows, those last MR + r
/// tokens are shared evenly by two (9 → 5 + 4 with AVX-512). A short panel
/// alone leaves the FMA or vdpbf16ps pipes waiting on too few chains (in L1,
/// one core, BF16: 1, 2, 3 tokens at 17, 34, 51% of 8; side by side over two
/// weight panels, 5 and 4 tokens reach 98-100%), and a job's tokens rarely
/// fill whole panels. A product of 256 prepared rows × 2048 on one core ran
/// 9-12 and 17-18 tokens 1.07-1.44× faster so (BF16; F32 up to 1.2×).
/// Tokens as BF16 pairs (`pairs`, for vdpbf16ps) go into as few panels of at
/// most gemm_pair_rows as hold them, of sizes one apart (16 → 6 + 5 + 5),
/// every one read over two weight panels side by side: per pair of depths,
/// one broadcast token feeds four dot products instead of two, and the first
/// token panel streams two weight panels where a panel of 8 streams one.
/// Against panels of 8 that made a dense BF16 FFN at 16 tokens 3-4% faster,
/// at 512 tokens 5%, E8A2's layer at 512 tokens 7-10%, at 64 (16 an expert)
/// 1-3%, S1A1E8's at 64 1-4% (A/B in one process, both link orders,
/// identical results); F32 panels cut so gained 3-5% at 512 tokens and lost
/// 1-3% at 64, and stay as they were. The cut changes no result: each
/// element's sum is the same whatever panel its token is in.
struct token_panels {
  index_t m;
  bool pairs = false;  ///< the tokens are packed as BF16 pairs (token_form::pairs)

  index_t count() const { return (m + most() - 1) / most(); }
  /// The tokens of panel ip: [start(ip), start(ip) + rows(ip)).
  index_t start(index_t ip) const {
    if (pairs) return ip * shorter() + std::min(ip, longer());
    return ip == count() - 1 && shared_tail() ? m - tail() / 2 : ip * gemm_mr;
  }
  index_t rows(index_t ip) const {
    if (pairs) return shorter() + (ip < longer() ? 1 : 0);
    if (shared_tail() && ip >= count() - 2) return ip == count() - 2 ? (tail() + 1) / 2 : tail() / 2;
    return std::min(gemm_mr, m - ip * gemm_mr);
  }
  /// Token t's panel.
  index_t panel_of(index_t t) const {
    if (pairs) {
      const index_t in_longer = longer() * (shorter() + 1);
      return t < in_longer ? t / (shorter() + 1) : longer() + (t - in_longer) / shorter();
    }
    return shared_tail() && t >= start(count() - 1) ? count() - 1 : t / gemm_mr;
  }

 private:
  index_t most() const { return pairs ? gemm_pair_rows : gemm_mr; }
  index_t shorter() const { return m / count(); }  // pairs: the tokens of the shorter panels
  index_t longer() const { return m % count(); }   // pairs: how many panels take one more
  index_t tail() const { return m - (count() - 2) * gemm_mr; }  // the last two panels' tokens
  bool shared_tail() const { return m > gemm_mr && m % gemm_mr != 0 && tail() <= 2 * gemm_pair_rows; }
};

/// micro_kernel_rows for the first `rows` (1..MR) token rows of one panel, `pf` as there.
template <class Tokens, class W>
inline void micro_kernel_tokens(index_t kl, Tokens a, const W* b, float* c, bool first, index_t rows, const fetch_share& pf = {}) {
  with_rows<int(gemm_mr)>(rows, [&](auto m) { micro_kernel_rows<decltype(m)::value, 1>(kl, a, &b, c, first, pf); });
}
/// micro_kernel_rows over `count` (2..panels_together(rows)) panels side by
/// side: for more than one token, two (panels_together); `pf` as there.
template <class Tokens, class W>
inline void micro_kernel_side_by_side(index_t kl, Tokens a, const W* const* b, index_t count, float* c, bool first, index_t rows, const fetch_share& pf) {
  if (rows > 1) return with_rows<int(gemm_pair_rows)>(rows, [&](auto m) { micro_kernel_rows<decltype(m)::value, 2>(kl, a, b, c, first, pf); });
  with_rows<int(gemm_max_together)>(count, [&](auto p) { micro_kernel_rows<1, decltype(p)::value>(kl, a, b, c, first, pf); });
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
/// apart, as at H = 2048, and packs a third slower from L2.) A last group of
/// fewer than eight rows is transposed with zeros for the missing ones, and
/// the lanes past it are zeroed a vector at a time: a router of 7 experts on
/// H = 4096 took 32 µs a token packed element by element, 17 µs so.
template <index_t width>
inline void pack_rows(const float* src, index_t ld, index_t rows, index_t kl, float* dst) {
#if defined(__AVX2__) && defined(__FMA__)
  static_assert(width % 8 == 0, "whole groups of eight lanes");
  index_t q0 = 0;
  const index_t k8 = kl / 8 * 8;
  for (; q0 < rows; q0 += 8) {
    const index_t real = std::min<index_t>(8, rows - q0);
    const float* row[8];
    index_t step[8];  // 1 along a real row, 0 on the zeros
    for (index_t q = 0; q < 8; ++q) {
      row[q] = q < real ? src + (q0 + q) * ld : zero_row();
      step[q] = q < real;
    }
    for (index_t k = 0; k < k8; k += 8) transpose8x8_of([&row, &step, k](int q) { return row[q] + k * step[q]; }, dst + k * width + q0, width);
    for (index_t k = k8; k < kl; ++k)
      for (index_t q = 0; q < 8; ++q) dst[k * width + q0 + q] = row[q][k * step[q]];
  }
  // (Every group, each store conditional: GCC makes a plain loop from q0 a
  // string store per k, which doubled the router's time.)
  if (q0 < width)
    for (index_t k = 0; k < kl; ++k)
      for (index_t q = 0; q < width; q += 8)
        if (q >= q0) _mm256_storeu_ps(dst + k * width + q, _mm256_setzero_ps());
#else
  for (index_t k = 0; k < kl; ++k) {
    for (index_t q = 0; q < rows; ++q) dst[k * width + q] = src[q * ld + k];
    for (index_t q = rows; q < width; ++q) dst[k * width + q] = 0.0f;
  }
#endif
}

/// Copies `count` rows given by pointers (token rows that were never
/// gathered), columns [k0, k0+kl), into panels of `width` rows laid out
/// [panel][k][width]; rows past `count` in the last panel are zero.
template <index_t width>
inline void pack_panels(const float* const* src, index_t count, index_t k0, index_t kl, float* dst) {
  const float* row[width];
  for (index_t p0 = 0; p0 < count; p0 += width, dst += kl * width) {
    for (index_t q = 0; q < width; ++q) row[q] = p0 + q < count ? src[p0 + q] + k0 : zero_row();
    pack_panel<width>(row, kl, dst);
  }
}

struct weight_block;

/// Whether this build has the BF16 dot-product path (AVX512_BF16).
#if defined(__AVX512BF16__)
constexpr bool bf16_dot_available = true;
#else
constexpr bool bf16_dot_available = false;
#endif

/// BF16 products over more than this many tokens may round the tokens (see
/// weight_format). Widening BF16 weights costs one FMA per weight and token,
/// so the exact path runs out of arithmetic when a product does more FLOPs
/// per weight byte (its token count) than FP32 peak / bandwidth, about 7 on
/// the Zen 5 this was measured on: on one thread, a dense H 2048 × I 5632
/// FFN took 4.1 ms at 1 token, 4.8-5.3 ms at 5 and 6.5 ms at 8 widened,
/// 3.8-4.5 and 4.2 ms with `vdpbf16ps`, which halves the instructions. With
/// every core streaming, though, a core's share of DRAM is the limit up to a
/// token panel (8 with AVX-512), and there `vdpbf16ps`, reading one weight
/// panel at a time for 7 or 8 tokens, streamed worse than widening: the
/// dense BF16 FFN at 8 tokens ran 11-18% faster exact (best and median, 2
/// threads, A/B in one process, both link orders), S3A3E8's layer at 8
/// tokens 2-5%, S1A1E8's at 8 and 64 tokens, Qwen3-30B-A3B's at 64 and the
/// dense one at 6 within 4%; DeepSeek-V2-Lite's at 64 tokens (6 an expert)
/// 2-5% slower. So a single stream's decode and a decoded batch of up to a
/// token panel stay exact. An expert's share of a 64-token batch is 4-32
/// tokens on the usual layers, so the rule is per product, not per batch.
constexpr index_t bf16_exact_tokens = 8;  // (AVX-512's gemm_mr: only AVX-512 builds have vdpbf16ps)

/// How prepared weights are stored and multiplied: F32, or BF16. With BF16,
/// products over more than bf16_exact_tokens tokens round the tokens to BF16
/// too and use `vdpbf16ps`, two multiply-adds per lane and instruction, when
/// `round_tokens` is set and the build has AVX512_BF16; otherwise the tokens
/// stay F32 and every product is exactly the F32 product of the BF16 weights.
/// Products over up to bf16_exact_tokens tokens (a single stream's decode)
/// always take the exact path: they are bound by the weights' bytes.
struct weight_format {
  dtype type = dtype::f32;
  bool round_tokens = true;
  weight_format(dtype t = dtype::f32, bool round = true) : type(t), round_tokens(round) {}  // implicit: a dtype is a format
};

/// Row-major weight values where a panel_matrix is packed from: F32 in
/// memory, or a file's F32, BF16 or F16 values in place (a loader's mapped
/// tensor: any alignment, each row read through memcpy and widened exactly),
/// `ld` values from one row to the next. With a `name`, the values are checked
/// as they are packed: a NaN or Inf is refused with value_error naming it and
/// the first such value's [row, column] in row-major order.
struct weight_rows {
  const void* data = nullptr;
  dtype type = dtype::f32;
  index_t ld = 0;
  std::string name;

  /// Values [k0, k0 + count) of row `row` as F32 into out.
  void widen(index_t row, index_t k0, index_t count, float* out) const {
    widen_to_f32(static_cast<const char*>(data) + std::size_t(row * ld + k0) * dtype_size(type), type, std::size_t(count), out);
  }
  /// The error for the first non-finite value of rows × depth (one must be there).
  value_error first_non_finite(index_t rows, index_t depth) const {
    std::vector<float> row(static_cast<std::size_t>(depth));
    for (index_t r = 0; r < rows; ++r) {
      widen(r, 0, depth, row.data());
      for (index_t c = 0; c < depth; ++c)
        if (!std::isfinite(row[std::size_t(c)])) return moeforge::detail::non_finite_error(name, row[std::size_t(c)], r, c);
    }
    return value_error(moeforge::detail::cat(name, ": a non-finite value was packed but is not found again"));
  }
};

/// Rows of a weight matrix in the micro-kernel's order, built once: panel p
/// holds rows [p·NR, p·NR + NR) as [depth][NR], rows past the end zero, in
/// F32 or BF16 (the weight type; BF16 values are F32 rounded to nearest even).
/// Panels restart at every cut (rows [cut_i, cut_i+1) start panel-aligned),
/// so a block that starts at a cut, such as a DualSparse expert's minor part,
/// reads whole panels.
class panel_matrix {
 public:
  panel_matrix() = default;
  /// Packs `rows` rows of depth `depth` from src (row-major, leading dimension
  /// ld), with panels restarting at `cuts` (ascending, inside (0, rows)), as
  /// values of type `type` (f32 or bf16).
  panel_matrix(const float* src, index_t ld, index_t rows, index_t depth, const std::vector<index_t>& cuts = {}, weight_format format = {})
      : panel_matrix(weight_rows{src, dtype::f32, ld, {}}, rows, depth, cuts, format) {}

  /// The same from rows wherever they are (see weight_rows): a file's values
  /// go to their panels in one pass, a depth block of a panel's rows at a
  /// time through L1, never through an F32 copy of the matrix.
  panel_matrix(const weight_rows& src, index_t rows, index_t depth, const std::vector<index_t>& cuts = {}, weight_format format = {})
      : panel_matrix(rows, depth, cuts, format) {
    // Every byte is written below: the storage is not zeroed first (a pass
    // over gigabytes when a model loads).
    auto owned = std::make_shared<std::vector<unsigned char, moeforge::detail::huge_page_allocator<unsigned char>>>(storage_bytes());
    unsigned char* out = owned->data();
    const bool in_place = src.type == dtype::f32 && reinterpret_cast<std::uintptr_t>(src.data) % alignof(float) == 0;
    float widened[gemm_nr * pack_kc];  // a depth block of a panel's rows, [row][k], when not read in place
    float scratch[pack_kc * gemm_nr];  // a BF16 panel's F32 values, one depth block
    bool finite = true;
    for (std::size_t s = 0; s < starts_.size(); ++s)
      for (index_t r = starts_[s]; r < segment_end(s); r += gemm_nr) {
        const std::size_t offset = std::size_t((first_panel_[s] + (r - starts_[s]) / gemm_nr) * depth * gemm_nr);
        const index_t count = std::min(gemm_nr, segment_end(s) - r);
        for (index_t k0 = 0; k0 < depth; k0 += pack_kc) {
          const index_t kl = std::min(pack_kc, depth - k0);
          if (!in_place)
            for (index_t q = 0; q < count; ++q) src.widen(r + q, k0, kl, widened + q * kl);
          float* dst = type_ == dtype::f32 ? reinterpret_cast<float*>(out) + offset + std::size_t(k0 * gemm_nr) : scratch;
          pack_rows<gemm_nr>(in_place ? static_cast<const float*>(src.data) + r * src.ld + k0 : widened, in_place ? src.ld : kl, count, kl, dst);
          if (!src.name.empty()) finite = finite && moeforge::detail::all_finite(Eigen::Map<const Eigen::ArrayXf>(dst, kl * gemm_nr));
          if (type_ == dtype::bf16) round_panel(scratch, kl, reinterpret_cast<bfloat16*>(out) + offset + std::size_t(k0 * gemm_nr));
        }
      }
    if (!finite) throw src.first_non_finite(rows, depth);
    data_ = out;
    keep_ = std::move(owned);
  }

  /// Panels built elsewhere in this build's order (what storage() of a
  /// panel_matrix of the same rows, depth, cuts and type holds: a packed
  /// model's file, mapped), read in place from `bytes` (storage_bytes() of
  /// them, aligned to their value type; the kernels' loads take any address,
  /// though whole cache lines stream best) for as long as `keep` lives.
  static panel_matrix view(const void* bytes, std::shared_ptr<const void> keep, index_t rows, index_t depth, const std::vector<index_t>& cuts,
                           weight_format format) {
    panel_matrix p(rows, depth, cuts, format);
    if (reinterpret_cast<std::uintptr_t>(bytes) % dtype_size(p.type_) != 0)
      throw config_error(moeforge::detail::cat("weight panels: a view's storage must be aligned to its ", dtype_size(p.type_), "-byte values"));
    p.data_ = static_cast<const unsigned char*>(bytes);
    p.keep_ = std::move(keep);
    return p;
  }

  index_t rows() const { return rows_; }
  index_t depth() const { return depth_; }
  dtype type() const { return type_; }
  /// Whether many-token products round the tokens to BF16 (see weight_format).
  bool dot() const { return dot_; }
  /// Bytes of panel storage (what a pass over every row reads).
  std::size_t bytes() const { return storage_bytes(); }
  /// The panels' bytes, as view() takes them.
  const void* storage() const { return data_; }
  /// Where panels restart (ascending, inside (0, rows())).
  std::vector<index_t> cuts() const { return starts_.empty() ? std::vector<index_t>{} : std::vector<index_t>(starts_.begin() + 1, starts_.end()); }
  /// The cuts a panel_matrix of `rows` rows keeps of `cuts` (those that rise inside (0, rows)).
  static std::vector<index_t> kept_cuts(const std::vector<index_t>& cuts, index_t rows) {
    std::vector<index_t> kept;
    for (const index_t c : cuts)
      if (c > (kept.empty() ? 0 : kept.back()) && c < rows) kept.push_back(c);
    return kept;
  }
  /// How many NR-row panels rows of depth `depth` with these cuts take.
  std::size_t panels() const { return std::size_t(panels_); }
  static index_t ceil_panels(index_t rows) { return (rows + gemm_nr - 1) / gemm_nr; }
  /// The first row at or after `row` where panels restart (rows() if none).
  index_t next_cut(index_t row) const {
    const auto it = std::upper_bound(starts_.begin(), starts_.end(), row);
    return it == starts_.end() ? rows_ : *it;
  }
  /// Rows [row0, row0 + rows) at depth [k0, …) as an operand of panel_product;
  /// the rows must not cross a cut.
  weight_block block(index_t row0, index_t rows, index_t k0) const;
  /// Panel p's values at depth k: [NR] for k, k + 1, … (W must be the panel
  /// type; BF16 rows in bf16_slot order).
  template <class W>
  const W* at(index_t panel, index_t k) const {
    return values_as<W>() + (panel * depth_ + k) * gemm_nr;
  }
  /// The panel holding `row`, and the row's place in it.
  std::pair<index_t, index_t> locate(index_t row) const {
    const std::size_t s = std::size_t(std::upper_bound(starts_.begin(), starts_.end(), row) - starts_.begin()) - 1;
    return {first_panel_[s] + (row - starts_[s]) / gemm_nr, (row - starts_[s]) % gemm_nr};
  }
  /// Row `row`, depth [k0, k0 + count), widened to F32 into out.
  void row_values(index_t row, index_t k0, index_t count, float* out) const {
    const auto [panel, q] = locate(row);
    for (index_t k = 0; k < count; ++k)
      out[k] = type_ == dtype::f32 ? panel_value(at<float>(panel, k0 + k), q) : panel_value(at<bfloat16>(panel, k0 + k), q);
  }

 private:
  /// The layout of rows × depth values of `format` with panels restarting at `cuts`; no storage yet.
  panel_matrix(index_t rows, index_t depth, const std::vector<index_t>& cuts, weight_format format)
      : rows_(rows), depth_(depth), type_(format.type), dot_(format.type == dtype::bf16 && format.round_tokens && bf16_dot_available) {
    if (type_ != dtype::f32 && type_ != dtype::bf16)
      throw config_error(moeforge::detail::cat("weight panels: dtype ", dtype_name(type_), " is not a kernel weight type (expected F32 or BF16)"));
    starts_.push_back(0);
    for (const index_t c : kept_cuts(cuts, rows)) starts_.push_back(c);
    for (std::size_t s = 0; s < starts_.size(); ++s) first_panel_.push_back(panels_), panels_ += ceil_panels(segment_end(s) - starts_[s]);
  }
  std::size_t storage_bytes() const { return std::size_t(panels_ * depth_ * gemm_nr) * dtype_size(type_); }
  template <class W>
  const W* values_as() const {
    return reinterpret_cast<const W*>(data_);
  }
  index_t segment_end(std::size_t s) const { return s + 1 < starts_.size() ? starts_[s + 1] : rows_; }
  /// An F32 panel [depth][NR] rounded to BF16 (f32_to_bf16) into dst, each
  /// panel row in bf16_slot order. Vectorised (loading a BF16 model packs
  /// gigabytes): the halves of a panel row, rows [0, NR/2) and [NR/2, NR),
  /// are rounded in 32-bit lanes and packed to 16 bits lane by lane, which
  /// interleaves four rows of each half per 128-bit lane: bf16_slot's order.
  static void round_panel(const float* src, index_t depth, bfloat16* dst) {
    for (index_t k = 0; k < depth; ++k, src += gemm_nr, dst += gemm_nr) {
#if defined(MOEFORGE_GEMM_AVX512)
      const auto round = [](const float* x) {
        const __m512 v = _mm512_loadu_ps(x);
        const __m512i bits = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
        const __m512i nearest = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
        const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));  // NaN stays NaN
        return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nearest, quiet);
      };
      _mm512_storeu_si512(dst, _mm512_packus_epi32(round(src), round(src + 16)));
#elif defined(__AVX2__) && defined(__FMA__)
      const auto round = [](const float* x) {
        const __m256 v = _mm256_loadu_ps(x);
        const __m256i bits = _mm256_castps_si256(v), one = _mm256_set1_epi32(1);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
        const __m256i nearest = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
        const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));  // NaN stays NaN
        return _mm256_blendv_epi8(nearest, quiet, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      };
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_packus_epi32(round(src), round(src + 8)));
#else
      for (index_t p = 0; p < gemm_nr; ++p) dst[p] = bfloat16{f32_to_bf16(src[bf16_row(p)])};
#endif
    }
  }
  index_t rows_ = 0, depth_ = 0;
  dtype type_ = dtype::f32;
  bool dot_ = false;
  std::vector<index_t> starts_, first_panel_;
  index_t panels_ = 0;
  const unsigned char* data_ = nullptr;  ///< the values, as type_; immutable once built, so copies share them
  std::shared_ptr<const void> keep_;     ///< what holds data_: this matrix's own storage or a mapped file
};

/// A panel's depth slice as the micro-kernel reads it: F32 or BF16 values.
struct panel_slice {
  const void* data = nullptr;
  dtype type = dtype::f32;
};

/// A block of weight rows, the `a` operand of panel_product: row-major F32
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
  panel_slice slice(index_t p, index_t k, index_t kl, float* buf) const {
    if (panels)
      return panels->type() == dtype::bf16 ? panel_slice{panels->at<bfloat16>(panel0 + p, k0 + k), dtype::bf16}
                                           : panel_slice{panels->at<float>(panel0 + p, k0 + k), dtype::f32};
    pack_rows<gemm_nr>(data + p * gemm_nr * ld + k, ld, std::min(gemm_nr, rows - p * gemm_nr), kl, buf);
    return {buf, dtype::f32};
  }
};

inline weight_block panel_matrix::block(index_t row0, index_t rows, index_t k0) const {
  const auto [panel, skip] = locate(row0);
  return {nullptr, 0, rows, this, panel, k0, skip};
}

/// The values of `count` (≤ gemm_max_together) slices of weight type W.
template <class W>
struct typed_slices {
  const W* p[gemm_max_together];
  typed_slices(const panel_slice* b, index_t count) {
    for (index_t q = 0; q < count; ++q) p[q] = static_cast<const W*>(b[q].data);
  }
};

/// The micro-kernel on `count` slices of one weight type side by side (one:
/// fetching `pf` meanwhile), into consecutive tiles from c.
template <class Tokens>
inline void micro_kernel_slices(index_t kl, Tokens a, const panel_slice* b, index_t count, float* c, bool first, index_t rows, const fetch_share& pf) {
  const auto run = [&](auto typed) {
    const typed_slices<std::remove_const_t<std::remove_pointer_t<decltype(typed)>>> in(b, count);
    if (count == 1)
      micro_kernel_tokens(kl, a, in.p[0], c, first, rows, pf);
    else
      micro_kernel_side_by_side(kl, a, in.p, count, c, first, rows, pf);
  };
  if (b[0].type == dtype::bf16)
    run(static_cast<const bfloat16*>(nullptr));
  else
    run(static_cast<const float*>(nullptr));
}

/// A token value as vdpbf16ps takes it: BF16, round to nearest even, a
/// subnormal flushed to zero as `vcvtneps2bf16` does, so a token rounds the
/// same in the vector and the scalar part of pack_token_pairs.
inline std::uint32_t bf16_token(float v) { return std::fpclassify(v) == FP_SUBNORMAL ? f32_to_bf16(std::copysign(0.0f, v)) : f32_to_bf16(v); }

/// Tokens as BF16 pairs for vdpbf16ps: for pair j of depth [k0, k0 + kl),
/// (x[k0 + 2j] | x[k0 + 2j + 1] << 16), the second zero past the end; laid
/// out [pair][MR] per panel of MR tokens, `count` tokens from src, rows past
/// them zero.
inline void pack_token_pairs(const float* const* src, index_t count, index_t k0, index_t kl, std::uint32_t* dst) {
  const index_t pairs = (kl + 1) / 2;
  for (index_t p0 = 0; p0 < count; p0 += gemm_mr, dst += pairs * gemm_mr) {
    index_t j0 = 0;
#if defined(__AVX512BF16__)
    // Eight tokens × eight pairs at a time: 16 consecutive values of a token
    // convert to its 8 pairs in order (`vcvtneps2bf16`, as bf16_token), and
    // an 8×8 transpose of those 32-bit pairs lays them out [pair][MR]. The
    // rows of a last, partial panel are zero here too: a job's tokens rarely
    // fill whole panels, and converting its last panel value by value cost
    // a tenth of the time at 16 tokens per expert.
    const index_t real = std::min(gemm_mr, count - p0);
    for (; 2 * j0 + 16 <= kl; j0 += 8) {
      alignas(32) float pairs8[gemm_mr][8];  // the pairs' bits, moved as floats
      for (index_t r = 0; r < gemm_mr; ++r)
        _mm256_store_ps(pairs8[r], r < real ? (__m256)_mm512_cvtneps_pbh(_mm512_loadu_ps(src[p0 + r] + k0 + 2 * j0)) : _mm256_setzero_ps());
      transpose8x8_of([&pairs8](int q) { return static_cast<const float*>(pairs8[q]); }, reinterpret_cast<float*>(dst + j0 * gemm_mr),
                      gemm_mr);
    }
#endif
    for (index_t r = 0; r < gemm_mr; ++r) {
      const float* x = p0 + r < count ? src[p0 + r] + k0 : nullptr;
      for (index_t j = j0; j < pairs; ++j) {
        const std::uint32_t lo = x ? bf16_token(x[2 * j]) : 0, hi = x && 2 * j + 1 < kl ? bf16_token(x[2 * j + 1]) : 0;
        dst[j * gemm_mr + r] = lo | hi << 16;
      }
    }
  }
}

/// Runs body() on the team when `parallel`, else on the calling thread alone.
/// body shares its work out with for_each_task. Serial outside any parallel
/// region, body is called directly: a one-thread region costs 2.3 µs to set up
/// here, a third of stories260K's decode step spread over its small products.
/// Inside an enclosing region (evaluation windows side by side) body still
/// gets a region of its own, so its loops never bind to the enclosing team.
template <class Body>
inline void run_on_team(bool parallel, Body&& body) {
#if defined(_OPENMP)
  if (!parallel && omp_get_level() == 0) return body();
#pragma omp parallel if (parallel)
  body();
#else
  (void)parallel;
  body();
#endif
}

/// How for_each_task hands out its tasks on a team.
enum class sharing {
  as_threads_free,  ///< one at a time to whichever thread is free (tasks of uneven cost)
  in_blocks,        ///< in equal contiguous blocks, one per thread
};

/// Calls task(i) for i < n: on a team of several threads shared out among
/// them (every thread of the team must call it, as an `omp for`), else in
/// order on the calling thread. Never an `omp for` outside a parallel region:
/// LLVM 14's libomp aborted on a dynamic one there (kmp_dispatch.cpp,
/// "steal_flag == THIEF") after regions of other team sizes.
template <class Task>
inline void for_each_task(std::ptrdiff_t n, Task&& task, sharing how = sharing::as_threads_free) {
#if defined(_OPENMP)
  if (omp_get_num_threads() > 1) {
    if (how == sharing::as_threads_free) {
#pragma omp for schedule(dynamic, 1)
      for (std::ptrdiff_t i = 0; i < n; ++i) task(i);
    } else {
#pragma omp for schedule(static)
      for (std::ptrdiff_t i = 0; i < n; ++i) task(i);
    }
    return;
  }
#else
  (void)how;
#endif
  for (std::ptrdiff_t i = 0; i < n; ++i) task(i);
}

/// How many values of T the buffers kept between calls hold (64 MiB).
template <class T>
constexpr std::size_t kept_count() {
  return (std::size_t(64) << 20) / sizeof(T);
}
/// `v`'s storage for at least `count` values. A thread's scratch vector only
/// grows: resizing one that had shrunk value-initialises all it regrows, and
/// the sizes asked for alternate from call to call (attention's blocks, an
/// expert's tokens), so a plain resize zeroed megabytes per product.
template <class T>
inline T* at_least(std::vector<T>& v, std::size_t count) {
  if (v.size() < count) v.resize(count);
  return v.data();
}
/// The kept store alone, for count ≤ kept_count<T>().
template <class Use, class T>
inline T* thread_kept(std::size_t count) {
  thread_local std::vector<T> kept;
  return at_least(kept, count);
}
/// Storage for `count` values of T on the calling thread, one store per
/// `Use` (a tag type, so that two buffers in use at once never share one):
/// kept between calls up to 64 MiB, its pages already mapped (a fresh
/// buffer's page faults cost more than the products they feed: 3 MB of
/// activations allocated per call made an E8A2 layer at 512 tokens 1.45×
/// slower), and a larger request in `own`, freed with it, so a long prefill
/// does not leave every thread holding its size. Valid until the thread's
/// next call for the same Use; read it through the pointer (inside a
/// parallel region a thread_local names each thread's own).
template <class Use, class T>
inline T* thread_scratch(std::size_t count, std::vector<T>& own) {
  if (count <= kept_count<T>()) return thread_kept<Use, T>(count);
  own.resize(count);
  return own.data();
}

/// micro_kernel_rows with BF16 tokens (pairs from pack_token_pairs) and BF16
/// panel slices b[p], p < P: the two depths of a pair are interleaved from two
/// panel rows in registers and taken by one vdpbf16ps.
#if defined(__AVX512BF16__)
template <int M, int P>
inline void micro_kernel_dot_rows(index_t kl, const std::uint32_t* a, const bfloat16* const* b, float* c, bool first, const fetch_share& pf) {
  __m512 lo[M][P], hi[M][P];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p) {
      lo[r][p] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + p * gemm_tile + r * gemm_nr);
      hi[r][p] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + p * gemm_tile + r * gemm_nr + 16);
    }
  for (index_t k = 0; k < kl; k += 2, a += gemm_mr) {
    fetch_ahead<P>(pf, k), fetch_ahead<P>(pf, k + 1);
    if (pf.own_ahead) fetch_panels_ahead<P>(b, k), fetch_panels_ahead<P>(b, k + 1);
    __m512bh p0[P], p1[P];
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p) {
      const bfloat16* row = b[p] + k * gemm_nr;
      const __m512i r0 = _mm512_loadu_si512(row), r1 = k + 1 < kl ? _mm512_loadu_si512(row + gemm_nr) : _mm512_setzero_si512();
      p0[p] = (__m512bh)_mm512_unpacklo_epi16(r0, r1), p1[p] = (__m512bh)_mm512_unpackhi_epi16(r0, r1);
    }
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(int(a[r]));
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) lo[r][p] = _mm512_dpbf16_ps(lo[r][p], x, p0[p]), hi[r][p] = _mm512_dpbf16_ps(hi[r][p], x, p1[p]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p)
      _mm512_storeu_ps(c + p * gemm_tile + r * gemm_nr, lo[r][p]), _mm512_storeu_ps(c + p * gemm_tile + r * gemm_nr + 16, hi[r][p]);
}
#else
template <int M, int P>
inline void micro_kernel_dot_rows(index_t, const std::uint32_t*, const bfloat16* const*, float*, bool, const fetch_share&) {}
#endif

/// micro_kernel_slices with tokens as BF16 pairs: the first `rows` (up to
/// gemm_pair_rows, as token_panels cuts pairs) over one BF16 slice or two
/// side by side.
inline void micro_kernel_dot_slices(index_t kl, const std::uint32_t* a, const panel_slice* b, index_t count, float* c, bool first, index_t rows,
                                    const fetch_share& pf) {
  const typed_slices<bfloat16> in(b, count);
  if (count == 1) return with_rows<int(gemm_pair_rows)>(rows, [&](auto m) { micro_kernel_dot_rows<decltype(m)::value, 1>(kl, a, in.p, c, first, pf); });
  with_rows<int(gemm_pair_rows)>(rows, [&](auto m) { micro_kernel_dot_rows<decltype(m)::value, 2>(kl, a, in.p, c, first, pf); });
}

/// Token panels of this many tokens or more fetch the next weight slices
/// while they read theirs (panel_product). Fewer are bound by the weights'
/// bytes, and read panels side by side: two to four sequential streams,
/// which the hardware prefetcher follows (and, as every first reader of a
/// slice, they fetch their own rows a little ahead: own_bytes_ahead).
/// Fetching their successors too slowed one and two tokens by 2-6%, and 4
/// (Qwen3-30B-A3B's experts at T = 64, BF16) by 5%; two panels of 5 and 4
/// tokens side by side with the 5 fetching (S1A1E8's routed experts at
/// T = 64, BF16) ran 4-6% faster than without, and than the same tokens cut
/// 8 + 1 (best of 6, alternated).
constexpr index_t gemm_fetching_rows = 5;
static_assert(panels_together(gemm_fetching_rows) <= 2, "a fetch_share holds the slices of two panels side by side");

/// Up to this many tokens the micro-kernel reads them in place from their
/// rows; more are packed into [k][MR] panels in depth blocks (by each
/// product, or once for the products that share them: prepacked_tokens),
/// which keeps a block of MC panels contiguous in L2 while every weight
/// panel passes over it. (The choice changes no result.)
constexpr index_t gemm_tokens_in_place = 32;

/// Whether panel_product rounds m tokens to BF16 pairs for vdpbf16ps with
/// these weight blocks (see weight_format): all are BF16 panels that ask for
/// it and there are more than bf16_exact_tokens tokens.
inline bool rounds_tokens(const panel_matrix* panels, index_t m) { return m > bf16_exact_tokens && panels && panels->dot(); }
inline bool rounds_tokens(std::initializer_list<weight_block> a, index_t m) {
  return std::all_of(a.begin(), a.end(), [m](const weight_block& blk) { return rounds_tokens(blk.panels, m); });
}

/// How panel_product reads m tokens against weight blocks: in place from
/// their rows (up to gemm_tokens_in_place), packed into F32 panels [k][MR]
/// (more), or rounded into BF16 pairs (rounds_tokens, however many).
enum class token_form { in_place, values, pairs };
inline token_form token_form_of(bool rounds, index_t m) {
  return rounds ? token_form::pairs : m > gemm_tokens_in_place ? token_form::values : token_form::in_place;
}
inline token_form token_form_of(std::initializer_list<weight_block> a, index_t m) { return token_form_of(rounds_tokens(a, m), m); }

/// A product's tokens packed beforehand in its token_form, as the product
/// packs a block of them itself, for all of them: depth blocks of gemm_kc
/// in order, each holding every token_panels panel's [kl][MR] values (or
/// [(kl+1)/2][MR] pairs) in turn, so a block of panels at one depth is
/// contiguous as in the product's own buffer. (Panels laid out over the
/// whole depth, 64 KiB apart at H = 2048, met in the same L2 sets: the
/// products then ran 2-4% slower than packing their own.) A product reads
/// the one of its form and packs its own tokens where that is null.
/// Products that share their tokens (a job's tasks, a projection's row
/// blocks) read one packing instead of each packing them again at every
/// depth block: a dense FFN at 512 tokens spent 8% of its F32 samples
/// packing tokens so, 1% once per job. It ran only 1% faster (its
/// micro-kernel now meets the tokens in L3, where they had just been
/// packed into L2), BF16 2-4%, DeepSeek-V2-Lite- and Qwen3-30B-A3B-shaped
/// layers at 512 tokens 4% (A/B in one process, identical results).
/// A packing made for other tokens counts or depths than a product's is
/// not read.
struct prepacked_tokens {
  const float* values = nullptr;
  const std::uint32_t* pairs = nullptr;
  index_t m = 0, k = 0;  ///< the tokens and depth packed
};
static_assert(gemm_kc % 2 == 0, "a depth block holds whole pairs");

/// Where panel ip's block at depth k0 (kl deep) starts in a prepacked_tokens
/// operand of `panels` token panels: for values, or for pairs (`pairs`).
inline std::size_t prepacked_offset(index_t panels, index_t ip, index_t k0, index_t kl, bool pairs) {
  return pairs ? std::size_t((k0 / 2 * panels + ip * ((kl + 1) / 2)) * gemm_mr) : std::size_t((k0 * panels + ip * kl) * gemm_mr);
}

/// One token panel's depth block [k0, k0 + kl) of `count` tokens (rows
/// src[t]) packed as the micro-kernel reads it: into pairs when given, else
/// into F32 values [kl][MR].
inline void pack_token_block(const float* const* src, index_t count, index_t k0, index_t kl, float* values, std::uint32_t* pairs) {
  if (pairs)
    pack_token_pairs(src, count, k0, kl, pairs);
  else
    pack_panels<gemm_mr>(src, count, k0, kl, values);
}

/// One token panel (panel ip of `panel_count`) to pack over its whole
/// depth into values or pairs (the other null), in prepacked_tokens' layout.
struct token_panel_fill {
  const float* const* src;
  index_t count, depth, panel_count, ip;
  float* values;
  std::uint32_t* pairs;
};

/// Packs the panels, one per task of for_each_task: on the team inside
/// run_on_team's region, serially outside one. None: no pass, no barrier.
inline void pack_token_panels(const std::vector<token_panel_fill>& fills) {
  if (fills.empty()) return;
  for_each_task(
      std::ptrdiff_t(fills.size()),
      [&](std::ptrdiff_t i) {
        const token_panel_fill& f = fills[std::size_t(i)];
        for (index_t k0 = 0; k0 < f.depth; k0 += gemm_kc) {
          const index_t kl = std::min(gemm_kc, f.depth - k0);
          const std::size_t at = prepacked_offset(f.panel_count, f.ip, k0, kl, f.pairs != nullptr);
          pack_token_block(f.src, f.count, k0, kl, f.pairs ? nullptr : f.values + at, f.pairs ? f.pairs + at : nullptr);
        }
      },
      sharing::in_blocks);
}

/// Storage on the calling thread for tokens packed once, and the panels
/// that fill it: add() every operand, then place() them. Only tokens that
/// several products read are worth it (`shared`), and only while they fit
/// the buffers kept between calls (thread_scratch's 64 MiB of each form):
/// past that, each product packs its own depth blocks rather than the call
/// faulting in fresh pages for a copy of every token (a long prefill's
/// activations). One token_storage per thread at a time: they share the
/// kept buffers.
class token_storage {
 public:
  /// Asks for m tokens (rows src[t]) of depth k packed in `form`, if it is
  /// not in_place and they are `shared`: place() sets where in `into` and
  /// appends the panels that fill it to `todo`.
  void add(const float* const* src, index_t m, index_t k, token_form form, bool shared, prepacked_tokens& into,
           std::vector<token_panel_fill>& todo) {
    if (form == token_form::in_place || !shared) return;
    const bool pairs = form == token_form::pairs;
    (pairs ? words_ : values_) += std::size_t(token_panels{m, pairs}.count()) * std::size_t(panel_size(k, pairs));
    asked_.push_back({src, m, k, pairs, &into, &todo});
  }
  /// Places every operand asked for in the kept buffers, or none if they
  /// do not fit (each product then packs its own).
  void place() {
    struct token_values;
    struct token_pairs;
    if (values_ > kept_count<float>() || words_ > kept_count<std::uint32_t>()) return;
    float* value = thread_kept<token_values, float>(values_);
    std::uint32_t* word = thread_kept<token_pairs, std::uint32_t>(words_);
    for (const request& r : asked_) {
      const token_panels tp{r.m, r.pairs};
      for (index_t ip = 0; ip < tp.count(); ++ip)
        r.todo->push_back({r.src + tp.start(ip), tp.rows(ip), r.k, tp.count(), ip, r.pairs ? nullptr : value, r.pairs ? word : nullptr});
      const index_t size = tp.count() * panel_size(r.k, r.pairs);
      if (r.pairs)
        r.into->pairs = word, word += size;
      else
        r.into->values = value, value += size;
      r.into->m = r.m, r.into->k = r.k;
    }
  }

 private:
  struct request {
    const float* const* src;
    index_t m, k;
    bool pairs;
    prepacked_tokens* into;
    std::vector<token_panel_fill>* todo;
  };
  /// One token panel's values or pairs over depth k.
  static index_t panel_size(index_t k, bool pairs) { return (pairs ? (k + 1) / 2 : k) * gemm_mr; }
  std::vector<request> asked_;
  std::size_t values_ = 0, words_ = 0;
};

/// out[t, c] = Σ_k b[t][k]·a[c, k] for t < m tokens, where the columns c run
/// over the rows of every block of `a` in turn (so gate and up rows give
/// [x·gateᵀ | x·upᵀ] with the tokens read once). Token t's k values are at
/// b[t]; out is row-major with leading dimension ldo; k is every block's
/// depth. `given` may hold the tokens already packed in the product's
/// token_form (token_storage): products that share their tokens pack them
/// once, not each. Single-threaded: callers run it inside their own
/// parallel tasks.
inline void panel_product(std::initializer_list<weight_block> a, const float* const* b, index_t m, index_t k, float* out, index_t ldo,
                          const prepacked_tokens& given = {}) {
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
  thread_local std::vector<std::uint32_t> bpairs;
  thread_local std::vector<panel_slice> slices;
  thread_local std::vector<char> prepared, read;
  // BF16 tokens when every block asks for them (see weight_format); the
  // tokens are then packed as pairs instead of F32 panels.
  const token_form form = token_form_of(a, m);
  const bool dot = form == token_form::pairs, f32_panels = form == token_form::values;
  const token_panels tp{m, dot};
  const index_t mpanels = tp.count();
  const bool fits = given.m == m && given.k == k;
  const std::uint32_t* const pairs = dot && fits ? given.pairs : nullptr;
  const float* const values = f32_panels && fits ? given.values : nullptr;
  // Depth blocks keep a weight slice in L1 or L2 while every token panel
  // passes over it. One token panel's worth read in place from prepared panels
  // reuses nothing, so its panels are read whole, each one long sequential
  // stream the prefetchers follow (F32 experts of 64 × 1408 at 6 tokens
  // each: 5-8% faster than in blocks of KC). (Even: vdpbf16ps takes pairs.
  // Prepacked tokens come in blocks of KC, which one panel reads in order.)
  const index_t kc = m <= gemm_mr && packed_panels == 0 ? (k + 1) / 2 * 2 : gemm_kc;
  at_least(apack, std::size_t(packed_panels * gemm_nr * kc));
  if (f32_panels && !values) at_least(bpack, std::size_t(gemm_mc * gemm_mr * kc));
  if (dot && !pairs) at_least(bpairs, std::size_t(std::min(mpanels, gemm_mc) * gemm_mr * (kc / 2)));
  at_least(tiles, std::size_t(mpanels * npanels * gemm_tile));
  // This depth block's slices, then the next block's prepared ones (empty
  // where packed per call), which the last panels of this block prefetch.
  at_least(slices, std::size_t(2 * npanels));
  prepared.clear();
  for (const auto& blk : a) prepared.insert(prepared.end(), std::size_t(blk.panel_count()), blk.panels != nullptr);
  for (index_t k0 = 0; k0 < k; k0 += kc) {
    const index_t kl = std::min(kc, k - k0);
    float* dst = apack.data();
    index_t jp = 0;
    for (const auto& blk : a)
      for (index_t p = 0; p < blk.panel_count(); ++p, ++jp) {
        slices[std::size_t(jp)] = blk.slice(p, k0, kl, dst);
        if (!blk.panels) dst += kl * gemm_nr;
        // (Fetched at this block's pace, a shorter last block is left out.)
        slices[std::size_t(npanels + jp)] = blk.panels && k0 + 2 * kl <= k ? blk.slice(p, k0 + kl, 0, nullptr) : panel_slice{};
      }
    for (index_t ic = 0; ic < mpanels; ic += gemm_mc) {
      const index_t iend = std::min(mpanels, ic + gemm_mc);
      // Token panel ip's pairs for this depth block, packed here or before,
      // at ic_pairs + (ip - ic)·pair_stride; its F32 panel likewise.
      const std::uint32_t* ic_pairs = pairs ? pairs + prepacked_offset(mpanels, ic, k0, kl, true) : bpairs.data();
      const float* ic_values = values ? values + prepacked_offset(mpanels, ic, k0, kl, false) : bpack.data();
      const index_t pair_stride = (kl + 1) / 2 * gemm_mr, value_stride = kl * gemm_mr;
      index_t together = 1;  // weight panels side by side that the block's shortest token panel takes
      std::size_t sharers = 0;  // token panels that fetch the next slices (see below)
      for (index_t ip = ic; ip < iend; ++ip) {
        together = std::max(together, panels_together(tp.rows(ip)));
        sharers += tp.rows(ip) >= gemm_fetching_rows;
        if ((dot && !pairs) || (f32_panels && !values))
          pack_token_block(b + tp.start(ip), tp.rows(ip), k0, kl, dot ? nullptr : bpack.data() + (ip - ic) * value_stride,
                           dot ? bpairs.data() + (ip - ic) * pair_stride : nullptr);
      }
      if (dot) together = std::min<index_t>(together, 2);
      read.assign(std::size_t(npanels), 0);  // the weight panels some token panel of this block has read
      for (jp = 0; jp < npanels;) {
        index_t group = 1;
        while (group < together && jp + group < npanels && slices[std::size_t(jp + group)].type == slices[std::size_t(jp)].type) ++group;
        // Each token panel reads the group's weight panels as many side by
        // side as its tokens take (panels_together). Prepared slices come
        // from memory: in the first token block the panels of
        // gemm_fetching_rows tokens or more fetch the slices after the group
        // (after the last, the first of the next depth block), each its
        // share, while they read theirs. (Rows never grow along the panels,
        // so the fetching ones are the block's first.) Not the one token
        // panel of a product reading one weight panel over the whole depth:
        // its own rows fetched ahead (own_bytes_ahead) run on into the next
        // panel, next in memory and next to be read, and fetching that panel
        // too made a dense FFN at 8 tokens 15-19% slower (BF16; F32 21-28%),
        // S3A3E8's layer at 8 tokens 5-14%. Several token panels over a
        // depth of one block (the down products of experts up to gemm_kc
        // wide) do fetch: Qwen3-30B-A3B's layer at 512 tokens (32 an expert)
        // ran 4-5% faster so, E8A2 at 64 tokens 3-7% (A/B in one process,
        // both orders, identical results).
        const auto side = [&](index_t ip) { return std::min(group, panels_together(tp.rows(ip))); };
        const auto run = [&](index_t ip, index_t g, index_t count) {
          const index_t rows = tp.rows(ip);
          float* tile = tiles.data() + (ip * npanels + jp + g) * gemm_tile;
          const panel_slice* in = &slices[std::size_t(jp + g)];
          fetch_share pf;
          pf.own_ahead = !read[std::size_t(jp + g)];
          std::fill_n(read.begin() + (jp + g), count, 1);
          if (ic == 0 && rows >= gemm_fetching_rows && (kl < k || count > 1 || mpanels > 1))
            for (index_t q = 0; q < count; ++q) {
              const auto j = std::size_t(jp + group + g + q);  // from npanels on, in the next depth block
              if (j >= std::size_t(2 * npanels) || (j < std::size_t(npanels) && !prepared[j]) || !slices[j].data) break;
              const std::size_t row_bytes = std::size_t(gemm_nr) * dtype_size(slices[j].type), sharer = std::size_t(ip - ic);
              pf.from[q] = static_cast<const char*>(slices[j].data) + sharer * std::size_t(kl) * row_bytes / sharers;
              pf.pace[q] = (row_bytes << 8) / sharers;
            }
          if (dot) return micro_kernel_dot_slices(kl, ic_pairs + (ip - ic) * pair_stride, in, count, tile, k0 == 0, rows, pf);
          if (f32_panels) return micro_kernel_slices(kl, packed_tokens{ic_values + (ip - ic) * value_stride}, in, count, tile, k0 == 0, rows, pf);
          const float* row[gemm_mr];
          for (index_t r = 0; r < rows; ++r) row[r] = b[tp.start(ip) + r] + k0;
          micro_kernel_slices(kl, token_rows{row}, in, count, tile, k0 == 0, rows, pf);
        };
        // Whole panels one weight panel at a time, each slice staying in L1
        // or L2 while they all pass over it; then the short ones side by side.
        for (index_t g = 0; g < group; ++g)
          for (index_t ip = ic; ip < iend; ++ip)
            if (side(ip) == 1) run(ip, g, 1);
        for (index_t ip = ic; ip < iend; ++ip)
          for (index_t g = 0, each = side(ip); each > 1 && g < group; g += each) run(ip, g, std::min(each, group - g));
        jp += group;
      }
    }
  }
  index_t panel0 = 0, col0 = 0;
  for (const auto& blk : a) {
    for (index_t t = 0; t < m; ++t) {
      const index_t ip = tp.panel_of(t);
      const float* tile_row = tiles.data() + (ip * npanels + panel0) * gemm_tile + (t - tp.start(ip)) * gemm_nr;
      for (index_t c = 0; c < blk.rows;) {
        const index_t q = blk.skip + c, run = std::min(gemm_nr - q % gemm_nr, blk.rows - c);
        std::copy_n(tile_row + q / gemm_nr * gemm_tile + q % gemm_nr, run, out + t * ldo + col0 + c);
        c += run;
      }
    }
    panel0 += blk.panel_count(), col0 += blk.rows;
  }
}

/// Below this many multiply-adds a product runs on the calling thread: waking
/// the team costs microseconds, and far more when the cores are shared.
constexpr double min_parallel_fma = 1 << 20;

/// A row-major F32 block of weight rows as panel_product takes it.
template <class Block>
inline weight_block rows_of(const Block& a) {
  return {a.data(), a.outerStride(), a.rows()};
}

/// [b·a₁ᵀ | b·a₂ᵀ | …] for weight blocks of k columns each, where row p of b
/// (k values) is at b[p], p < m: one panel_product, so each element is the
/// same FMA chain as in the FFN kernel. Single-threaded.
inline matrix times_transpose(std::initializer_list<weight_block> a, const float* const* b, index_t m, index_t k) {
  index_t n = 0;
  for (const auto& blk : a) n += blk.rows;
  matrix out(m, n);
  if (m > 0 && n > 0) panel_product(a, b, m, k, out.data(), out.outerStride());
  return out;
}

/// The same with b a row-major matrix.
inline matrix times_transpose(std::initializer_list<weight_block> a, const_matrix_ref b) {
  std::vector<const float*> rows(static_cast<std::size_t>(b.rows()));
  for (index_t p = 0; p < b.rows(); ++p) rows[std::size_t(p)] = b.row(p).data();
  return times_transpose(a, rows.data(), b.rows(), b.cols());
}

}  // namespace moeforge::runtime::detail
