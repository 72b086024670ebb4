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
  /// Fitted linear scorer: s = W·x + b (`weight` [E, H], `bias` [E] or empty
  /// for b = 0), e.g. a ridge regression of each expert's output norm on x;
  /// p = softmax(s), top-k; gate weights are exactly `scale`. Costs E·(H+1)
  /// multiply-adds per token.
  linear_topk,
  /// Fitted scorer on quadratic features of a low-rank projection:
  /// z = P·x + c (`projection` [r, H], `projection_bias` [r]),
  /// q = (z_i·z_j for i ≤ j, row by row: z_0z_0, z_0z_1, …, z_{r-1}z_{r-1}),
  /// s = W·x + b + Q·q (`weight_quad` [E, r(r+1)/2]); p = softmax(s), top-k;
  /// gate weights are exactly `scale`. Costs r·H + r(r+1)/2 + E·(H + 1 + r(r+1)/2)
  /// multiply-adds per token. Rank 0 (P, c and Q empty) is the linear scorer.
  quadratic_topk,
  /// Diagnostic upper bound, not a deployable router: computes every routed
  /// expert and scores s_e = ‖expert_e(x) − c_e‖ (c_e: the layer's
  /// compensation mean when it has one, else 0), p = softmax(s), top-k; gate
  /// weights are exactly `scale`. `weight` [E, H] only carries the shape.
  /// Its cost is every routed expert's.
  oracle,
};

inline std::string_view router_kind_name(router_kind k) {
  switch (k) {
    case router_kind::softmax_topk: return "softmax_topk";
    case router_kind::cmoe_analytic: return "cmoe_analytic";
    case router_kind::centroid_topk: return "centroid_topk";
    case router_kind::linear_topk: return "linear_topk";
    case router_kind::quadratic_topk: return "quadratic_topk";
    case router_kind::oracle: return "oracle";
  }
  return "?";
}

/// Every router kind, for parsers and tests.
/// router_kind::oracle is not among them: a diagnostic the native format does not store.
inline constexpr router_kind all_router_kinds[] = {router_kind::softmax_topk, router_kind::cmoe_analytic, router_kind::centroid_topk,
                                                  router_kind::linear_topk, router_kind::quadratic_topk};

/// True for the kinds whose gate weights are p (the others only select).
inline bool weighs_by_probability(router_kind k) { return k == router_kind::softmax_topk; }

/// DualSparse-MoE dynamic dropping, applied per token after top-k selection.
/// With ŝ_j = p_j / Σ_{top-k} p (p: the router's probability of a selected
/// expert) and f_e = expert_factor[e] (1 when empty), which scales each of
/// 1t's and 2t's thresholds — 2t's margin with them, not added after:
enum class drop_kind {
  none,    ///< every selected expert is computed in full
  one_t,   ///< "1t": expert j is computed iff ŝ_j ≥ T·f_j, else dropped
  two_t,   ///< "2t": ŝ_j ≥ (T+margin)·f_j: full; max(0, T−margin)·f_j ≤ ŝ_j < (T+margin)·f_j: major part only; else dropped
  naee,    ///< "naee": drop j (not the top-1) iff p_j < threshold·p_1 (threshold = β)
  top_p,   ///< "top-p": keep experts in descending order until Σ ŝ of the kept ones reaches threshold (= p)
};

inline std::string_view drop_kind_name(drop_kind k) {
  switch (k) {
    case drop_kind::none: return "none";
    case drop_kind::one_t: return "1t";
    case drop_kind::two_t: return "2t";
    case drop_kind::naee: return "naee";
    case drop_kind::top_p: return "top-p";
  }
  return "?";
}

inline constexpr drop_kind all_drop_kinds[] = {drop_kind::none, drop_kind::one_t, drop_kind::two_t, drop_kind::naee, drop_kind::top_p};

/// Parses "none", "1t", "2t", "naee" or "top-p"; throws config_error naming the text.
inline drop_kind parse_drop_kind(std::string_view text) {
  for (auto k : all_drop_kinds)
    if (text == drop_kind_name(k)) return k;
  throw config_error(detail::cat("drop policy '", text, "': expected none, 1t, 2t, naee or top-p"));
}

/// The drop policy as plain data on the router, so the model, the native
/// format and every forward pass carry it (see drop_kind for the rules).
struct drop_policy {
  drop_kind kind = drop_kind::none;
  float threshold = 0.0f;  ///< 1t/2t: T on the normalised score; naee: β; top-p: p
  float margin = 0.01f;    ///< 2t: T_major = T − margin, T_minor = T + margin
  /// Per expert, a multiplier of T for 1t/2t (load-aware thresholds: under-loaded
  /// experts get a lower T). Empty: 1 for every expert.
  std::vector<float> expert_factor;

  bool active() const { return kind != drop_kind::none; }
  float factor(index_t expert) const { return expert_factor.empty() ? 1.0f : expert_factor[std::size_t(expert)]; }
};

/// Throws config_error naming `what` unless the policy is usable for `experts` experts.
inline void validate(const drop_policy& d, index_t experts, const std::string& what) {
  if (!std::isfinite(d.threshold) || d.threshold < 0.0f || d.threshold > 1.0f)
    throw config_error(detail::cat(what, ".threshold = ", d.threshold, ", expected a value in [0, 1]"));
  if (d.kind == drop_kind::two_t && !(d.margin >= 0.0f && std::isfinite(d.margin)))
    throw config_error(detail::cat(what, ".margin = ", d.margin, ", expected >= 0 (T_major = T - margin must not exceed T_minor = T + margin)"));
  if (!d.expert_factor.empty()) {
    if (index_t(d.expert_factor.size()) != experts)
      throw config_error(detail::cat(what, ".expert_factor: ", d.expert_factor.size(), " entries, expected ", experts, " (one per expert)"));
    for (std::size_t e = 0; e < d.expert_factor.size(); ++e)
      if (!(d.expert_factor[e] >= 0.0f && d.expert_factor[e] <= 1.0f))
        throw config_error(detail::cat(what, ".expert_factor[", e, "] = ", d.expert_factor[e], ", expected a value in [0, 1]"));
  }
}

struct router {
  router_kind kind = router_kind::softmax_topk;
  matrix weight;     ///< [E, H]: the linear router, G for cmoe_analytic, the centroids for centroid_topk
  matrix weight_up;  ///< [E, H]: U for cmoe_analytic; empty otherwise
  vector bias;             ///< [E]: linear_topk, quadratic_topk; empty otherwise
  matrix projection;       ///< [r, H]: quadratic_topk's P; empty otherwise
  vector projection_bias;  ///< [r]: quadratic_topk's c; empty otherwise
  matrix weight_quad;      ///< [E, r(r+1)/2]: quadratic_topk's Q; empty otherwise
  index_t top_k = 1;
  bool renormalize = true;  ///< softmax_topk only
  float scale = 1.0f;       ///< multiplies every gate weight
  drop_policy drop;         ///< DualSparse dynamic dropping (none by default)

  index_t experts() const { return weight.rows(); }
  index_t rank() const { return projection.rows(); }
  bool fitted() const { return kind == router_kind::linear_topk || kind == router_kind::quadratic_topk; }
  /// Multiply-adds per token of a fitted scorer (0 for the other kinds, whose
  /// cost the active-fraction accounting has never included).
  double fitted_macs() const {
    const double e = double(experts()), h = double(weight.cols()), r = double(rank()), q = r * (r + 1) / 2;
    if (kind == router_kind::linear_topk) return e * (h + 1);
    if (kind == router_kind::quadratic_topk) return r * h + q + e * (h + 1 + q);
    return 0.0;
  }
};

/// Novice compensation (moeforge's extension of CMoE): every routed expert a
/// token does not compute contributes its mean calibration output. Stored as
/// y += bias − Σ_{computed pairs} means[e], with bias = Σ_e means[e] (or a
/// refitted intercept), so it costs H adds per computed pair; exactly zero
/// when every expert is computed and bias is the sum of the means.
struct novice_compensation {
  vector bias;   ///< [H]; empty: no compensation
  matrix means;  ///< [E, H]

  bool active() const { return bias.size() != 0; }
};

/// One routed expert slot. A MoNE novice replaces the expert's weights by a
/// constant output vector (still multiplied by the slot's gate weight).
struct routed_expert {
  ffn weights;          ///< empty when the slot is a novice
  vector novice;        ///< [H] when the slot is a novice; empty otherwise
  /// DualSparse: the expert's neurons are ordered by importance and the first
  /// `major` of them form the major sub-expert (0 = the first half, rounded up).
  index_t major = 0;
  /// DualSparse partial transformation: the expert is the sub-experts
  /// [0, parts[0]), [parts[0], parts[1]), …, [parts.back(), width), which share
  /// the expert's gate weight (the complete transformation and the Hugging
  /// Face export turn them into experts of their own). Strictly ascending cut
  /// points inside (0, width); empty: one sub-expert. The output is the same
  /// either way; the kernel cuts an expert only where its tokens' widths differ.
  std::vector<index_t> parts;

  bool is_novice() const { return novice.size() != 0; }
  index_t width() const { return is_novice() ? 0 : weights.intermediate(); }
  index_t major_width() const {
    return major > 0 ? major : (width() + 1) / 2;
  }
  index_t sub_experts() const { return index_t(parts.size()) + 1; }
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
  novice_compensation compensation;

  index_t hidden() const { return router.weight.cols(); }
  index_t num_experts() const { return index_t(experts.size()); }
};

/// The work one token can ask of a layer, in neurons by their neuron_cost():
/// how routing's count_work and the models' active fractions count it.
struct moe_token_work {
  double shared = 0;  ///< every shared expert
  double routed = 0;  ///< every routed expert (novices cost nothing)
  double router = 0;  ///< a fitted router's multiply-adds / H; an oracle computes every routed expert; the older kinds 0
};

inline moe_token_work token_work(const moe_layer& m) {
  moe_token_work w;
  for (const auto& s : m.shared) w.shared += double(s.weights.intermediate()) * s.weights.neuron_cost();
  for (const auto& e : m.experts)
    if (!e.is_novice()) w.routed += double(e.width()) * e.weights.neuron_cost();
  if (m.hidden() > 0) w.router = m.router.fitted_macs() / double(m.hidden());
  if (m.router.kind == router_kind::oracle) w.router = w.routed;
  return w;
}

/// validate(f, what, hidden), or, when f's matrices were released and that
/// is allowed, a check of the shape it records.
inline void validate_held(const ffn& f, const std::string& what, index_t hidden, bool may_be_released) {
  if (!(may_be_released && f.released)) return validate(f, what, hidden);
  if (f.hidden() != hidden || f.intermediate() < 1)
    throw shape_error(detail::cat(what, ": released with shape [", f.intermediate(), ", ", f.hidden(), "], expected [neurons > 0, ", hidden, "]"));
}

/// Checks every shape and option against the router's hidden size; throws
/// shape_error or config_error naming `what` and the offending part. With
/// `routed_may_be_released`, a routed expert may be a released FFN (only its
/// shape, see release(ffn&)): what one process of an expert-parallel run
/// holds of the experts another process computes. With
/// `shared_may_be_released` the shared experts may be too (an owning
/// transformer's structure, whose panels hold every FFN).
inline void validate(const moe_layer& m, const std::string& what, bool routed_may_be_released = false, bool shared_may_be_released = false) {
  const auto& r = m.router;
  const index_t e = r.weight.rows();
  const index_t h = r.weight.cols();
  if (e == 0 || h == 0) throw shape_error(detail::cat(what, ".router.weight: shape [", e, ", ", h, "], expected [experts > 0, hidden > 0]"));
  if (m.num_experts() != e)
    throw shape_error(detail::cat(what, ": ", m.num_experts(), " experts but the router has ", e, " rows"));
  auto only_for = [&](bool used, index_t size, const char* field) {
    if (!used && size != 0)
      throw shape_error(detail::cat(what, ".router.", field, ": must be empty for a ", router_kind_name(r.kind), " router"));
    return used;
  };
  if (only_for(r.kind == router_kind::cmoe_analytic, r.weight_up.size(), "weight_up"))
    detail::require_shape(r.weight_up, e, h, what + ".router.weight_up");
  if (only_for(r.fitted(), r.bias.size(), "bias") && r.bias.size() != 0 && r.bias.size() != e)
    throw shape_error(detail::cat(what, ".router.bias: size ", r.bias.size(), ", expected ", e, " or empty"));
  const bool quad = r.kind == router_kind::quadratic_topk;
  only_for(quad, r.projection.size(), "projection");
  only_for(quad, r.projection_bias.size(), "projection_bias");
  only_for(quad, r.weight_quad.size(), "weight_quad");
  if (quad && (r.projection.size() || r.projection_bias.size() || r.weight_quad.size())) {
    const index_t rank = r.projection.rows();
    if (rank < 1 || rank > h)
      throw config_error(detail::cat(what, ".router.projection: rank ", rank, ", expected 1..", h, " (the hidden size)"));
    detail::require_shape(r.projection, rank, h, what + ".router.projection");
    if (r.projection_bias.size() != rank)
      throw shape_error(detail::cat(what, ".router.projection_bias: size ", r.projection_bias.size(), ", expected ", rank));
    detail::require_shape(r.weight_quad, e, rank * (rank + 1) / 2, what + ".router.weight_quad");
  }
  if (m.compensation.active()) {
    if (m.compensation.bias.size() != h)
      throw shape_error(detail::cat(what, ".compensation.bias: size ", m.compensation.bias.size(), ", expected ", h));
    detail::require_shape(m.compensation.means, e, h, what + ".compensation.means");
  } else if (m.compensation.means.size() != 0) {
    throw shape_error(what + ".compensation.means: must be empty without a compensation bias");
  }
  if (r.top_k < 1 || r.top_k > e)
    throw config_error(detail::cat(what, ".router.top_k = ", r.top_k, ", expected 1..", e));
  if (!std::isfinite(r.scale)) throw value_error(what + ".router.scale is not finite");
  // A negative scale turns every routed term around: MoNE's scores and
  // DualSparse's thresholds would then rank the most-used experts last.
  if (r.scale < 0) throw value_error(detail::cat(what, ".router.scale = ", r.scale, ", expected >= 0"));
  validate(r.drop, e, what + ".router.drop");
  for (index_t i = 0; i < e; ++i) {
    const auto& x = m.experts[std::size_t(i)];
    const std::string name = detail::cat(what, ".experts[", i, "]");
    if (x.is_novice()) {
      if (!x.parts.empty()) throw config_error(name + ": a novice has no sub-experts");
      if (x.novice.size() != h) throw shape_error(detail::cat(name, ".novice: size ", x.novice.size(), ", expected ", h));
      if (x.weights.up.size() != 0) throw shape_error(name + ": a novice must not also hold weights");
    } else {
      validate_held(x.weights, name, h, routed_may_be_released);
      if (x.major < 0 || x.major > x.width())
        throw config_error(detail::cat(name, ".major = ", x.major, ", expected 0..", x.width()));
      for (std::size_t p = 0; p < x.parts.size(); ++p)
        if (x.parts[p] <= (p ? x.parts[p - 1] : 0) || x.parts[p] >= x.width())
          throw config_error(detail::cat(name, ".parts: cut points must rise strictly inside (0, ", x.width(), "), got ",
                                         x.parts[p], " at ", p));
    }
  }
  for (std::size_t i = 0; i < m.shared.size(); ++i) {
    const std::string name = detail::cat(what, ".shared[", i, "]");
    validate_held(m.shared[i].weights, name, h, shared_may_be_released);
    if (m.shared[i].gated() && m.shared[i].gate.size() != h)
      throw shape_error(detail::cat(name, ".gate: size ", m.shared[i].gate.size(), ", expected ", h));
  }
}

/// Number of stored values of the layer: router, experts (a novice counts its
/// H values), shared experts and their gates.
inline index_t parameter_count(const moe_layer& m) {
  const auto& r = m.router;
  index_t n = r.weight.size() + r.weight_up.size() + r.bias.size() + r.projection.size() + r.projection_bias.size() +
              r.weight_quad.size() + m.compensation.bias.size() + m.compensation.means.size();
  for (const auto& e : m.experts) n += e.is_novice() ? e.novice.size() : parameter_count(e.weights);
  for (const auto& s : m.shared) n += parameter_count(s.weights) + s.gate.size();
  return n;
}

/// Throws value_error on the first NaN or Inf anywhere in the layer.
inline void require_finite(const moe_layer& m, const std::string& what) {
  detail::require_finite(m.router.weight, what + ".router.weight");
  detail::require_finite(m.router.weight_up, what + ".router.weight_up");
  detail::require_finite(m.router.bias, what + ".router.bias");
  detail::require_finite(m.router.projection, what + ".router.projection");
  detail::require_finite(m.router.projection_bias, what + ".router.projection_bias");
  detail::require_finite(m.router.weight_quad, what + ".router.weight_quad");
  detail::require_finite(m.compensation.bias, what + ".compensation.bias");
  detail::require_finite(m.compensation.means, what + ".compensation.means");
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
