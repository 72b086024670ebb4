// Routing: router probabilities, top-k selection (with per-pair work: full,
// major-only or dropped), and the routing plan the kernel executes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "moeforge/core/moe.hpp"

namespace moeforge::runtime {

/// How much of a selected expert a token computes.
enum class pair_work : std::uint8_t { full, major, dropped };

/// The top-k choice of every token. Entry `t*k + j` is token t's j-th expert
/// in descending router probability (ties: lower expert index_t first).
struct selection {
  index_t tokens = 0;
  index_t k = 0;
  std::vector<std::int32_t> expert;  ///< [T*k]
  std::vector<float> prob;           ///< [T*k] router probability p (the score)
  std::vector<float> weight;         ///< [T*k] gate weight applied to the output
  std::vector<pair_work> work;       ///< [T*k] full unless a drop policy said otherwise
};

/// Tokens grouped by expert (counting sort, stable in token order), with the
/// dropped pairs removed. Pairs of expert e are [offsets[e], offsets[e+1]).
struct routing_plan {
  index_t tokens = 0;
  std::vector<index_t> offsets;        ///< [E+1]
  std::vector<std::int32_t> token;   ///< [pairs] token of the pair
  std::vector<float> weight;         ///< [pairs] gate weight
  std::vector<std::int32_t> width;   ///< [pairs] neurons to compute: the expert's first `width` (0 for novices)
  std::vector<float> shared_weight;  ///< [shared × T] multiplier of each shared expert's output

  index_t experts() const { return index_t(offsets.size()) - 1; }
  index_t pairs() const { return index_t(token.size()); }
};

}  // namespace moeforge::runtime

namespace moeforge::detail {

inline void softmax_rows(matrix& s) {
  for (index_t t = 0; t < s.rows(); ++t) {
    auto row = s.row(t);
    const float mx = row.maxCoeff();
    row = (row.array() - mx).exp();
    row /= row.sum();
  }
}

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

}  // namespace moeforge::detail

namespace moeforge::runtime {

/// Router probabilities p [T, E] for tokens x [T, H].
inline matrix router_probs(const router& r, const_matrix_ref x) {
  moeforge::detail::require_shape(x, x.rows(), r.weight.cols(), "router input");
  matrix s = x * r.weight.transpose();
  if (r.kind == router_kind::centroid_topk) {
    for (index_t t = 0; t < s.rows(); ++t) {
      const float n = x.row(t).norm();
      s.row(t) *= n > 0.0f ? 1.0f / n : 0.0f;
    }
  }
  if (r.kind == router_kind::cmoe_analytic) {
    const matrix u = x * r.weight_up.transpose();
    for (index_t t = 0; t < s.rows(); ++t)
      for (index_t e = 0; e < s.cols(); ++e) s(t, e) = std::abs(activate(activation::silu, s(t, e)) * u(t, e));
  }
  moeforge::detail::softmax_rows(s);
  return s;
}

/// Top-k of `probs` per token, with the gate weights the router defines.
inline selection select_topk(const router& r, const matrix& probs) {
  const index_t e = probs.cols();
  const index_t k = r.top_k;
  if (k < 1 || k > e) throw config_error(moeforge::detail::cat("router.top_k = ", k, ", expected 1..", e));
  selection sel;
  sel.tokens = probs.rows();
  sel.k = k;
  const std::size_t n = std::size_t(sel.tokens * k);
  sel.expert.resize(n);
  sel.prob.resize(n);
  sel.weight.resize(n);
  sel.work.assign(n, pair_work::full);
  std::vector<std::int32_t> order(static_cast<std::size_t>(e));
  for (index_t t = 0; t < sel.tokens; ++t) {
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](std::int32_t a, std::int32_t b) {
      const float pa = probs(t, index_t(a)), pb = probs(t, index_t(b));
      return pa > pb || (pa == pb && a < b);
    });
    float sum = 0.0f;
    for (index_t j = 0; j < k; ++j) sum += probs(t, index_t(order[std::size_t(j)]));
    for (index_t j = 0; j < k; ++j) {
      const std::size_t at = std::size_t(t * k + j);
      const std::int32_t ex = order[std::size_t(j)];
      sel.expert[at] = ex;
      sel.prob[at] = probs(t, index_t(ex));
      // Only softmax_topk weighs the outputs by p; the analytic and centroid routers select.
      float w = r.kind == router_kind::softmax_topk ? probs(t, index_t(ex)) : 1.0f;
      if (r.kind == router_kind::softmax_topk && r.renormalize) w /= sum;
      sel.weight[at] = w * r.scale;
    }
  }
  return sel;
}

/// Groups the selected pairs by expert; dropped pairs cost nothing because
/// they are not in the plan. Shared-expert multipliers come from `x`.
inline routing_plan make_plan(const moe_layer& m, const selection& sel, const_matrix_ref x) {
  const index_t e = m.num_experts();
  routing_plan plan;
  plan.tokens = sel.tokens;
  plan.offsets.assign(std::size_t(e + 1), 0);
  for (std::size_t i = 0; i < sel.expert.size(); ++i)
    if (sel.work[i] != pair_work::dropped) ++plan.offsets[std::size_t(sel.expert[i]) + 1];
  for (index_t i = 0; i < e; ++i) plan.offsets[std::size_t(i + 1)] += plan.offsets[std::size_t(i)];
  const std::size_t pairs = std::size_t(plan.offsets.back());
  plan.token.resize(pairs);
  plan.weight.resize(pairs);
  plan.width.resize(pairs);
  std::vector<index_t> next(plan.offsets.begin(), plan.offsets.end() - 1);
  for (index_t t = 0; t < sel.tokens; ++t) {
    for (index_t j = 0; j < sel.k; ++j) {
      const std::size_t i = std::size_t(t * sel.k + j);
      if (sel.work[i] == pair_work::dropped) continue;
      const auto& ex = m.experts[std::size_t(sel.expert[i])];
      const std::size_t at = std::size_t(next[std::size_t(sel.expert[i])]++);
      plan.token[at] = std::int32_t(t);
      plan.weight[at] = sel.weight[i];
      plan.width[at] = std::int32_t(sel.work[i] == pair_work::major ? ex.major_width() : ex.width());
    }
  }
  plan.shared_weight.assign(m.shared.size() * std::size_t(sel.tokens), 1.0f);
  for (std::size_t s = 0; s < m.shared.size(); ++s) {
    if (!m.shared[s].gated()) continue;
    for (index_t t = 0; t < sel.tokens; ++t)
      plan.shared_weight[s * std::size_t(sel.tokens) + std::size_t(t)] = moeforge::detail::sigmoid(x.row(t).dot(m.shared[s].gate));
  }
  return plan;
}

/// The plan the layer's router makes for `x`, computing every selected expert in full.
inline routing_plan route(const moe_layer& m, const_matrix_ref x) {
  return make_plan(m, select_topk(m.router, router_probs(m.router, x)), x);
}

}  // namespace moeforge::runtime
