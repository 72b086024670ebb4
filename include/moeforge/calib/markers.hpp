// CMoE activation markers: for each calibration token, the top-K_a neurons by
// |silu(x̂·ĝ_i)·(x̂·û_i)|, stored as one bitset over tokens per neuron, plus rates.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <numeric>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "moeforge/core/ffn.hpp"
#include "moeforge/runtime/gemm.hpp"

namespace moeforge::calib {

/// Binary activation markers, neuron-major: neuron i's bits over tokens are
/// words [i*words, (i+1)*words); bit t%64 of word t/64 is token t. Bits past
/// `tokens` in the last word are zero, so popcounts need no masking.
struct markers {
  index_t tokens = 0;
  index_t neurons = 0;
  index_t ka = 0;     ///< markers set per token
  index_t words = 0;  ///< 64-bit words per neuron
  std::vector<std::uint64_t> bits;
  std::vector<index_t> counts;  ///< [neurons] tokens on which the neuron is marked

  const std::uint64_t* column(index_t i) const { return bits.data() + std::size_t(i * words); }
  double rate(index_t i) const { return tokens ? double(counts[std::size_t(i)]) / double(tokens) : 0.0; }
};

namespace detail {

// 1/‖row‖ (0 for zero rows): scaling GEMM outputs by it avoids normalised weight copies.
inline Eigen::RowVectorXf inverse_row_norms(const matrix& m) {
  Eigen::RowVectorXf out(m.rows());
  for (index_t r = 0; r < m.rows(); ++r) {
    const float n = m.row(r).norm();
    out(r) = n > 0.0f ? 1.0f / n : 0.0f;
  }
  return out;
}

inline int popcount64(std::uint64_t v) { return __builtin_popcountll(v); }

}  // namespace detail

namespace detail {

// The markers' GEMM: C[t, (gate|up) of neuron i] = x̂_t · W[i] for a chunk of
// tokens, register-blocked (MR tokens × NR = NP gate + NP up columns of the same
// NP neurons) over packed panels, KC-deep. Every element is summed over k in
// ascending order, KC at a time, whatever the thread count: the result is the
// same bits with 1 or N threads (threads split the token chunks).
// The micro-kernel, tile sizes and panel packer are the FFN kernel's
// (runtime/gemm.hpp); the [gate | up] panel layout is the markers' own.
constexpr index_t marker_mr = runtime::detail::gemm_mr;  // tokens per micro-tile
constexpr index_t marker_nr = runtime::detail::gemm_nr;  // NP gate + NP up columns
constexpr index_t marker_np = marker_nr / 2;               // neurons per weight panel
constexpr index_t marker_kc = runtime::detail::pack_kc;    // (as tuned; the FFN's products block deeper with AVX-512)
constexpr index_t marker_nc = 128;                         // neurons per B block (256 KiB, L2)
constexpr index_t marker_mc = runtime::detail::gemm_mc;
static_assert(marker_np % 8 == 0 && marker_nc % marker_np == 0, "panels hold whole groups of 8 neurons");

// One token's running top-K_a: a heap whose top is the worst kept neuron
// (smallest |h|, then the larger index). Neurons arrive in ascending index order,
// so a newcomer enters a full heap only when strictly larger than the worst.
struct marker_entry {
  float mag;
  std::int32_t neuron;
};
inline bool marker_better(const marker_entry& p, const marker_entry& q) {
  return p.mag > q.mag || (p.mag == q.mag && p.neuron < q.neuron);
}

}  // namespace detail

/// Markers of `f` on calibration inputs x [T, H]. Threads take chunks of
/// `block` tokens (rounded up to a multiple of 64 so chunks own whole words);
/// each chunk streams the weights through a register-blocked GEMM fused with
/// the activation and a per-token top-K_a heap, so the [T, I] activations are
/// never stored. Extra memory per thread: block·H (packed inputs) + block·256
/// (partial sums) floats + a 256 KiB weight block + block·K_a heap entries.
/// The same markers, bit for bit, for any thread count.
inline markers compute_markers(const ffn& f, const_matrix_ref x, index_t ka, index_t block = 1024) {
  validate(f, "ffn");
  if (!f.gated()) throw config_error("cmoe markers: the FFN has no gate projection (CMoE needs a gated FFN)");
  moeforge::detail::require_shape(x, x.rows(), f.hidden(), "calibration inputs");
  const index_t t_count = x.rows();
  const index_t n = f.intermediate();
  const index_t h = f.hidden();
  if (t_count == 0) throw config_error("cmoe markers: zero calibration tokens");
  if (ka < 1 || ka > n) throw config_error(moeforge::detail::cat("cmoe markers: K_a = ", ka, ", expected 1..", n, " (the FFN's neurons)"));
  // A NaN magnitude breaks the top-K_a heap's order: the markers would be arbitrary.
  moeforge::detail::require_finite_rows(x, "cmoe markers: calibration token");
  require_finite(f, "cmoe markers: ffn");
  block = std::max<index_t>(64, (block + 63) / 64 * 64);
  using detail::marker_kc;
  using detail::marker_mc;
  using detail::marker_mr;
  using detail::marker_nc;
  using detail::marker_np;
  using detail::marker_nr;

  markers mk;
  mk.tokens = t_count;
  mk.neurons = n;
  mk.ka = ka;
  mk.words = (t_count + 63) / 64;
  mk.bits.assign(std::size_t(n * mk.words), 0);
  const Eigen::RowVectorXf g_inv = detail::inverse_row_norms(f.gate);
  const Eigen::RowVectorXf u_inv = detail::inverse_row_norms(f.up);
  // The same, zero-padded to whole panels for the vectorised bound.
  std::vector<float> g_pad(std::size_t((n + marker_np - 1) / marker_np * marker_np), 0.0f), u_pad(g_pad.size(), 0.0f);
  std::copy(g_inv.data(), g_inv.data() + n, g_pad.begin());
  std::copy(u_inv.data(), u_inv.data() + n, u_pad.begin());
  const index_t blocks = (t_count + block - 1) / block;
  const index_t k_blocks = (h + marker_kc - 1) / marker_kc;
  std::vector<std::exception_ptr> failed(static_cast<std::size_t>(blocks));  // (bad_alloc) must not escape the parallel region

#pragma omp parallel
  {
    std::vector<float> apack, cbuf, bpack;
    std::vector<detail::marker_entry> heaps;
#pragma omp for schedule(dynamic, 1)
    for (index_t blk = 0; blk < blocks; ++blk) try {
        const index_t t0 = blk * block;
        const index_t rows = std::min(block, t_count - t0);
        const index_t panels = (rows + marker_mr - 1) / marker_mr;
        // Normalised inputs, packed [k block][token panel][k][MR] (zero rows pad the last panel).
        apack.assign(std::size_t(panels * marker_mr * h), 0.0f);
        for (index_t r = 0; r < rows; ++r) {
          const float nr = x.row(t0 + r).norm();
          const float* src = x.row(t0 + r).data();
          const index_t p = r / marker_mr, q = r % marker_mr;
          for (index_t kb = 0; kb < k_blocks; ++kb) {
            const index_t k0 = kb * marker_kc, kl = std::min(marker_kc, h - k0);
            float* dst = apack.data() + std::size_t(k0 * panels * marker_mr + p * kl * marker_mr + q);
            for (index_t k = 0; k < kl; ++k) dst[k * marker_mr] = nr > 0.0f ? src[k0 + k] / nr : src[k0 + k];
          }
        }
        cbuf.resize(std::size_t(panels * marker_nc / marker_np * marker_mr * marker_nr));
        bpack.resize(std::size_t(marker_nc / marker_np * marker_kc * marker_nr));
        heaps.assign(std::size_t(rows * ka), detail::marker_entry{0.0f, 0});
        std::vector<index_t> heap_size(static_cast<std::size_t>(rows), 0);
        for (index_t jc = 0; jc < n; jc += marker_nc) {
          const index_t nn = std::min(marker_nc, n - jc), jpanels = (nn + marker_np - 1) / marker_np;
          for (index_t kb = 0; kb < k_blocks; ++kb) {
            const index_t k0 = kb * marker_kc, kl = std::min(marker_kc, h - k0);
            // Weights packed [neuron panel][k][NP gate | NP up] (zero columns pad the last panel).
            for (index_t jp = 0; jp < jpanels; ++jp) {
              const float* row[marker_nr];
              for (index_t q = 0; q < marker_np; ++q) {
                const index_t i = jc + jp * marker_np + q;
                row[q] = i < n ? f.gate.row(i).data() + k0 : runtime::detail::zero_row();
                row[marker_np + q] = i < n ? f.up.row(i).data() + k0 : runtime::detail::zero_row();
              }
              runtime::detail::pack_panel<marker_nr>(row, kl, bpack.data() + std::size_t(jp * kl * marker_nr));
            }
            const float* ablock = apack.data() + std::size_t(k0 * panels * marker_mr);
            for (index_t ic = 0; ic < panels; ic += marker_mc) {
              const index_t iend = std::min(panels, ic + marker_mc);
              for (index_t jp = 0; jp < jpanels; ++jp)
                for (index_t ip = ic; ip < iend; ++ip)
                  runtime::detail::micro_kernel(kl, ablock + std::size_t(ip * kl * marker_mr), bpack.data() + std::size_t(jp * kl * marker_nr),
                                        cbuf.data() + std::size_t((ip * (marker_nc / marker_np) + jp) * marker_mr * marker_nr), kb == 0);
            }
          }
          // |h| = |silu(x̂·ĝ)·(x̂·û)| for this block's neurons, into each token's heap. The
          // bound |h| <= |x̂·û|·(v > 0 ? v : min(|v|, 0.28)) (v = x̂·ĝ) skips neurons that
          // cannot enter a full heap; it holds in float too (rounding is monotone).
          for (index_t r = 0; r < rows; ++r) {
            const index_t p = r / marker_mr, q = r % marker_mr;
            detail::marker_entry* hp = heaps.data() + std::size_t(r * ka);
            index_t& size = heap_size[std::size_t(r)];
            for (index_t jp = 0; jp < jpanels; ++jp) {
              const float* c = cbuf.data() + std::size_t((p * (marker_nc / marker_np) + jp) * marker_mr * marker_nr + q * marker_nr);
              const index_t i0 = jc + jp * marker_np;
              std::uint32_t candidates = ~std::uint32_t(0);
#if defined(__AVX2__) && defined(__FMA__)
              if (size == ka) {  // the same bound, 8 neurons at once, against the heap's worst so far
                candidates = 0;
                for (index_t e = 0; e < marker_np; e += 8) {
                  const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(c + e), _mm256_loadu_ps(g_pad.data() + i0 + e));
                  const __m256 b = _mm256_andnot_ps(_mm256_set1_ps(-0.0f),
                                                    _mm256_mul_ps(_mm256_loadu_ps(c + marker_np + e), _mm256_loadu_ps(u_pad.data() + i0 + e)));
                  const __m256 neg = _mm256_min_ps(_mm256_xor_ps(v, _mm256_set1_ps(-0.0f)), _mm256_set1_ps(0.28f));
                  const __m256 s = _mm256_blendv_ps(neg, v, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ));
                  const auto mask = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_mul_ps(b, s), _mm256_set1_ps(hp[0].mag), _CMP_NLT_UQ)));
                  candidates |= std::uint32_t(mask) << e;
                }
              }
#endif
              for (index_t e = 0; e < marker_np; ++e) {
                const index_t i = i0 + e;
                if (i >= n) break;
                if (!((candidates >> e) & 1u)) continue;
                const float v = c[e] * g_inv(i);
                const float b = std::abs(c[marker_np + e] * u_inv(i));
                if (size == ka && b * (v > 0.0f ? v : std::min(-v, 0.28f)) < hp[0].mag) continue;
                const detail::marker_entry cand{std::abs(activate(activation::silu, v) * b), std::int32_t(i)};
                if (size < ka) {
                  hp[size++] = cand;
                  std::push_heap(hp, hp + size, detail::marker_better);
                } else if (cand.mag > hp[0].mag) {
                  std::pop_heap(hp, hp + size, detail::marker_better);
                  hp[size - 1] = cand;
                  std::push_heap(hp, hp + size, detail::marker_better);
                }
              }
            }
          }
        }
        for (index_t r = 0; r < rows; ++r) {
          const index_t t = t0 + r;
          const std::uint64_t bit = std::uint64_t(1) << (t % 64);
          for (index_t j = 0; j < ka; ++j) mk.bits[std::size_t(heaps[std::size_t(r * ka + j)].neuron * mk.words + t / 64)] |= bit;
        }
      } catch (...) {
        failed[std::size_t(blk)] = std::current_exception();
      }
  }
  for (const auto& e : failed)
    if (e) std::rethrow_exception(e);
  mk.counts.assign(std::size_t(n), 0);
  for (index_t i = 0; i < n; ++i) {
    const std::uint64_t* c = mk.column(i);
    index_t s = 0;
    for (index_t w = 0; w < mk.words; ++w) s += detail::popcount64(c[w]);
    mk.counts[std::size_t(i)] = s;
  }
  return mk;
}

/// Neurons sorted by descending rate, ties by lower index.
inline std::vector<index_t> neurons_by_rate(const markers& mk) {
  std::vector<index_t> order(static_cast<std::size_t>(mk.neurons));
  std::iota(order.begin(), order.end(), index_t(0));
  std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return mk.counts[std::size_t(a)] > mk.counts[std::size_t(b)]; });
  return order;
}

}  // namespace moeforge::calib
