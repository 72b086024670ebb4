// CMoE activation markers: for each calibration token, the top-K_a neurons by
// |silu(x̂·ĝ_i)·(x̂·û_i)|, stored as one bitset over tokens per neuron, plus rates.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "moeforge/core/ffn.hpp"

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

/// Markers of `f` on calibration inputs x [T, H]. Tokens are processed in
/// blocks (a multiple of 64 so blocks own whole words and write without races);
/// extra memory is O(threads·block·I) floats plus T·I bits.
inline markers compute_markers(const ffn& f, const_matrix_ref x, index_t ka, index_t block = 256) {
  validate(f, "ffn");
  if (!f.gated()) throw config_error("cmoe markers: the FFN has no gate projection (CMoE needs a gated FFN)");
  moeforge::detail::require_shape(x, x.rows(), f.hidden(), "calibration inputs");
  const index_t t_count = x.rows();
  const index_t n = f.intermediate();
  if (t_count == 0) throw config_error("cmoe markers: zero calibration tokens");
  if (ka < 1 || ka > n) throw config_error(moeforge::detail::cat("cmoe markers: K_a = ", ka, ", expected 1..", n, " (the FFN's neurons)"));
  block = std::max<index_t>(64, (block + 63) / 64 * 64);

  markers mk;
  mk.tokens = t_count;
  mk.neurons = n;
  mk.ka = ka;
  mk.words = (t_count + 63) / 64;
  mk.bits.assign(std::size_t(n * mk.words), 0);
  const Eigen::RowVectorXf g_inv = detail::inverse_row_norms(f.gate);
  const Eigen::RowVectorXf u_inv = detail::inverse_row_norms(f.up);
  const index_t blocks = (t_count + block - 1) / block;

#pragma omp parallel
  {
    matrix xb, a, b;
    std::vector<std::int32_t> order(static_cast<std::size_t>(n));
    std::vector<float> mag(static_cast<std::size_t>(n));
#pragma omp for schedule(dynamic, 1)
    for (index_t blk = 0; blk < blocks; ++blk) {
      const index_t t0 = blk * block;
      const index_t rows = std::min(block, t_count - t0);
      xb = x.middleRows(t0, rows);
      for (index_t r = 0; r < rows; ++r) {
        const float nr = xb.row(r).norm();
        if (nr > 0.0f) xb.row(r) /= nr;
      }
      a.noalias() = xb * f.gate.transpose();
      b.noalias() = xb * f.up.transpose();
      for (index_t r = 0; r < rows; ++r) {
        for (index_t i = 0; i < n; ++i)
          mag[std::size_t(i)] = std::abs(activate(activation::silu, a(r, i) * g_inv(i)) * (b(r, i) * u_inv(i)));
        std::iota(order.begin(), order.end(), 0);
        // A strict total order (|h| descending, then index) makes the top-K_a unique.
        std::nth_element(order.begin(), order.begin() + (ka - 1), order.end(), [&](std::int32_t p, std::int32_t q) {
          const float mp = mag[std::size_t(p)], mq = mag[std::size_t(q)];
          return mp > mq || (mp == mq && p < q);
        });
        const index_t t = t0 + r;
        const std::uint64_t bit = std::uint64_t(1) << (t % 64);
        for (index_t j = 0; j < ka; ++j) mk.bits[std::size_t(order[std::size_t(j)] * mk.words + t / 64)] |= bit;
      }
    }
  }
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
