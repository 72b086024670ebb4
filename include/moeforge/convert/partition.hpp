// DualSparse-MoE's exact transformations of an MoE layer (arXiv 2508.18376):
// splitting experts into sub-experts (partial: router unchanged; complete: a
// plain MoE with E·P experts) and reordering an expert's neurons. None of them
// changes what the layer computes, up to float summation order.
#pragma once

#include <numeric>
#include <string>
#include <vector>

#include "moeforge/core/moe.hpp"

namespace moeforge::convert {

/// Cut points splitting `width` neurons into P contiguous chunks whose sizes
/// differ by at most one, the first ⌈width/P⌉ wide (the larger sizes are
/// spread, not all first: 6 into 4 is 2, 1, 2, 1): P = 2 cuts at
/// ⌈width/2⌉, the default major width.
inline std::vector<index_t> even_cuts(index_t width, index_t parts) {
  std::vector<index_t> cuts;
  for (index_t p = 1; p < parts; ++p) cuts.push_back((p * width + parts - 1) / parts);
  return cuts;
}

/// Throws config_error unless `width` neurons, `whose` ("expert 3's"), split
/// into P sub-experts of at least one neuron each (P >= 1 is the caller's).
inline void check_partition(index_t width, index_t parts, const std::string& what, const std::string& whose) {
  if (width < parts)
    throw config_error(moeforge::detail::cat(what, ": partition P = ", parts, " exceeds ", whose, " width of ", width, " neurons (expected 1..", width, ")"));
}

/// Throws config_error unless every routed expert of `m` can be split into P sub-experts.
inline void check_partition(const moe_layer& m, index_t parts, const std::string& what) {
  if (parts < 1) throw config_error(moeforge::detail::cat(what, ": partition P = ", parts, ", expected >= 1"));
  for (std::size_t e = 0; e < m.experts.size(); ++e)
    if (!m.experts[e].is_novice()) check_partition(m.experts[e].width(), parts, what, moeforge::detail::cat("expert ", e, "'s"));
}

/// Partial transformation: every routed expert runs as P sub-experts that
/// share its gate weight (router unchanged). P = 1 removes any partition.
inline void partition_experts(moe_layer& m, index_t parts, const std::string& what = "partition") {
  check_partition(m, parts, what);
  for (auto& e : m.experts)
    if (!e.is_novice()) e.parts = even_cuts(e.width(), parts);
}

/// Reorders expert `e`'s neurons: new neuron i is old neuron order[i]. The
/// output is unchanged; the partition's cut points stay where they are.
inline void permute_neurons(routed_expert& e, const std::vector<index_t>& order) {
  e.weights = select_neurons(e.weights, order);
}

/// Complete transformation: a plain MoE with E·P experts (sub-expert p of
/// expert e is expert e·P + p), router rows repeated P times, top-(k·P).
/// Copies of an expert's router row score alike, so top-(k·P) picks exactly
/// the P sub-experts of the original top-k experts (ties between copies break
/// by index, and copies are adjacent). A softmax router then gives each copy
/// p/P (renormalised or not, the weight is 1/P of the expert's), so the
/// sub-experts' down projections are scaled by P; the analytic and centroid
/// routers' gate weights are exactly `scale` whatever p is, so nothing is
/// scaled. A novice becomes P novices whose outputs add up to it. A fitted
/// router's bias and quadratic rows are repeated like its weight rows (its
/// projection is per layer), and novice compensation gives each sub-expert
/// 1/P of its expert's mean, so the P sub-experts of a selected expert remove
/// that expert's mean (up to the rounding of mean/P in float). Without a drop policy only: dropping
/// thresholds mean something else on E·P experts; nor for the oracle router,
/// which scores each (sub-)expert by its own output.
inline moe_layer complete_transformation(const moe_layer& m, index_t parts, const std::string& what = "complete transformation") {
  check_partition(m, parts, what);
  if (m.router.drop.active())
    throw config_error(moeforge::detail::cat(what, ": the layer has a ", drop_kind_name(m.router.drop.kind),
                                             " drop policy; the complete transformation is exact only without dropping"));
  if (m.router.kind == router_kind::oracle)
    throw config_error(moeforge::detail::cat(what, ": the oracle router scores every sub-expert by its own output, so its top-",
                                             m.router.top_k * parts, " is not the split of its top-", m.router.top_k,
                                             " (a diagnostic router; split the layer's deployable router instead)"));
  const index_t e_count = m.num_experts();
  const float gain = m.router.kind == router_kind::softmax_topk ? float(parts) : 1.0f;
  // Repeats every row of a per-expert table P times (an empty table stays empty).
  const auto repeat_rows = [&](const matrix& a) {
    matrix r(a.rows() * parts, a.cols());
    for (index_t i = 0; i < r.rows(); ++i) r.row(i) = a.row(i / parts);
    return r;
  };
  moe_layer out;
  out.shared = m.shared;
  out.router.kind = m.router.kind;
  out.router.top_k = m.router.top_k * parts;
  out.router.renormalize = m.router.renormalize;
  out.router.scale = m.router.scale;
  out.router.weight = repeat_rows(m.router.weight);
  out.router.weight_up = repeat_rows(m.router.weight_up);
  out.router.bias = repeat_rows(m.router.bias);
  out.router.weight_quad = repeat_rows(m.router.weight_quad);
  out.router.projection = m.router.projection;
  out.router.projection_bias = m.router.projection_bias;
  if (m.compensation.active()) {
    out.compensation.bias = m.compensation.bias;
    out.compensation.means = repeat_rows(m.compensation.means) / float(parts);
  }
  for (index_t e = 0; e < e_count; ++e) {
    const auto& ex = m.experts[std::size_t(e)];
    std::vector<index_t> bounds{0};
    if (!ex.is_novice()) {
      const auto cuts = even_cuts(ex.width(), parts);
      bounds.insert(bounds.end(), cuts.begin(), cuts.end());
      bounds.push_back(ex.width());
    }
    for (index_t p = 0; p < parts; ++p) {
      routed_expert sub;
      if (ex.is_novice()) {
        sub.novice = ex.novice * (gain / float(parts));
      } else {
        std::vector<index_t> neurons(std::size_t(bounds[std::size_t(p + 1)] - bounds[std::size_t(p)]));
        std::iota(neurons.begin(), neurons.end(), bounds[std::size_t(p)]);
        sub.weights = select_neurons(ex.weights, neurons);
        if (gain != 1.0f) sub.weights.down *= gain;
      }
      out.experts.push_back(std::move(sub));
    }
  }
  validate(out, what);
  return out;
}

}  // namespace moeforge::convert
