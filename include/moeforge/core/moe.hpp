// The MoE layer as plain data: a router, routed experts (any widths; a slot
// may hold a MoNE novice instead of weights), and always-on shared experts.
#pragma once

#include <string>
#include <vector>

#include "moeforge/core/ffn.hpp"

namespace moeforge {

enum class router_kind {
  /// Mixtral / Qwen2-MoE: p = softmax(W·x) over all experts, then top-k;
  /// gate weights are p (renormalised over the top-k if `renormalize`), times `scale`.
  softmax_topk,
  /// CMoE analytic router: s_j = |silu(G_j·x)·(U_j·x)|, p = softmax(s), top-k;
  /// gate weights are exactly `scale` (1 by default), whatever p is.
  cmoe_analytic,
  /// MoEfication-style centroid router: s_j = (x/‖x‖)·C_j, where row C_j of
  /// `weight` is a cluster centroid (e.g. the mean of the L2-normalised gate
  /// rows of expert j's neurons); p = softmax(s), top-k; gate weights are
  /// exactly `scale`, whatever p is. A zero x scores 0 everywhere.
  centroid_topk,
};

inline std::string_view router_kind_name(router_kind k) {
  switch (k) {
    case router_kind::softmax_topk: return "softmax_topk";
    case router_kind::cmoe_analytic: return "cmoe_analytic";
    case router_kind::centroid_topk: return "centroid_topk";
  }
  return "?";
}

/// Every router kind, for parsers and tests.
inline constexpr router_kind all_router_kinds[] = {router_kind::softmax_topk, router_kind::cmoe_analytic, router_kind::centroid_topk};

struct router {
  router_kind kind = router_kind::softmax_topk;
  matrix weight;     ///< [E, H]: the linear router, G for cmoe_analytic, the centroids for centroid_topk
  matrix weight_up;  ///< [E, H]: U for cmoe_analytic; empty otherwise
  index_t top_k = 1;
  bool renormalize = true;  ///< softmax_topk only
  float scale = 1.0f;       ///< multiplies every gate weight

  index_t experts() const { return weight.rows(); }
};

/// One routed expert slot. A MoNE novice replaces the expert's weights by a
/// constant output vector (still multiplied by the slot's gate weight).
struct routed_expert {
  ffn weights;          ///< empty when the slot is a novice
  vector novice;        ///< [H] when the slot is a novice; empty otherwise
  /// DualSparse: the expert's neurons are ordered by importance and the first
  /// `major` of them form the major sub-expert (0 = the first half, rounded up).
  index_t major = 0;

  bool is_novice() const { return novice.size() != 0; }
  index_t width() const { return is_novice() ? 0 : weights.intermediate(); }
  index_t major_width() const {
    return major > 0 ? major : (width() + 1) / 2;
  }
};

/// An always-on expert. With a `gate` vector ([H], Qwen2-MoE's
/// shared_expert_gate) its output is scaled by sigmoid(gate·x).
struct shared_expert {
  ffn weights;
  vector gate;

  bool gated() const { return gate.size() != 0; }
};

struct moe_layer {
  moeforge::router router;
  std::vector<routed_expert> experts;
  std::vector<shared_expert> shared;

  index_t hidden() const { return router.weight.cols(); }
  index_t num_experts() const { return index_t(experts.size()); }
};

/// Checks every shape and option against the router's hidden size; throws
/// shape_error or config_error naming `what` and the offending part.
inline void validate(const moe_layer& m, const std::string& what) {
  const auto& r = m.router;
  const index_t e = r.weight.rows();
  const index_t h = r.weight.cols();
  if (e == 0 || h == 0) throw shape_error(detail::cat(what, ".router.weight: shape [", e, ", ", h, "], expected [experts > 0, hidden > 0]"));
  if (m.num_experts() != e)
    throw shape_error(detail::cat(what, ": ", m.num_experts(), " experts but the router has ", e, " rows"));
  if (r.kind == router_kind::cmoe_analytic)
    detail::require_shape(r.weight_up, e, h, what + ".router.weight_up");
  else if (r.weight_up.size() != 0)
    throw shape_error(detail::cat(what, ".router.weight_up: must be empty for a ", router_kind_name(r.kind), " router"));
  if (r.top_k < 1 || r.top_k > e)
    throw config_error(detail::cat(what, ".router.top_k = ", r.top_k, ", expected 1..", e));
  if (!std::isfinite(r.scale)) throw value_error(what + ".router.scale is not finite");
  for (index_t i = 0; i < e; ++i) {
    const auto& x = m.experts[std::size_t(i)];
    const std::string name = detail::cat(what, ".experts[", i, "]");
    if (x.is_novice()) {
      if (x.novice.size() != h) throw shape_error(detail::cat(name, ".novice: size ", x.novice.size(), ", expected ", h));
      if (x.weights.up.size() != 0) throw shape_error(name + ": a novice must not also hold weights");
    } else {
      validate(x.weights, name, h);
      if (x.major < 0 || x.major > x.width())
        throw config_error(detail::cat(name, ".major = ", x.major, ", expected 0..", x.width()));
    }
  }
  for (std::size_t i = 0; i < m.shared.size(); ++i) {
    const std::string name = detail::cat(what, ".shared[", i, "]");
    validate(m.shared[i].weights, name, h);
    if (m.shared[i].gated() && m.shared[i].gate.size() != h)
      throw shape_error(detail::cat(name, ".gate: size ", m.shared[i].gate.size(), ", expected ", h));
  }
}

/// Throws value_error on the first NaN or Inf anywhere in the layer.
inline void require_finite(const moe_layer& m, const std::string& what) {
  detail::require_finite(m.router.weight, what + ".router.weight");
  detail::require_finite(m.router.weight_up, what + ".router.weight_up");
  for (std::size_t i = 0; i < m.experts.size(); ++i) {
    const std::string name = detail::cat(what, ".experts[", i, "]");
    require_finite(m.experts[i].weights, name);
    detail::require_finite(m.experts[i].novice, name + ".novice");
  }
  for (std::size_t i = 0; i < m.shared.size(); ++i) {
    const std::string name = detail::cat(what, ".shared[", i, "]");
    require_finite(m.shared[i].weights, name);
    detail::require_finite(m.shared[i].gate, name + ".gate");
  }
}


}  // namespace moeforge
