// Routing: router probabilities, top-k selection (with per-pair work: full,
// major-only or dropped), and the routing plan the kernel executes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "moeforge/core/moe.hpp"
#include "moeforge/detail/mul_add.hpp"
#include "moeforge/runtime/packed_ffn.hpp"
#include "moeforge/runtime/project.hpp"

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

namespace detail {
/// The product of router matrix w into `out`: from its panels when given
/// (packed_router), which must hold w's shape, else from w.
inline projection router_product(const matrix& w, const panel_matrix* panels, matrix& out) {
  if (!panels) return projection(w, out);
  if (panels->rows() != w.rows() || panels->depth() != w.cols())
    throw shape_error(moeforge::detail::cat("router panels of [", panels->rows(), ", ", panels->depth(), "] for a router matrix of [", w.rows(), ", ",
                                            w.cols(), "]: packed from another router"));
  return projection(*panels, out);
}
/// Member `part` of `panels`, or null without them.
inline const panel_matrix* router_panels(const packed_router* panels, panel_matrix packed_router::*part) { return panels ? &(panels->*part) : nullptr; }
}  // namespace detail

/// The quadratic features q [T, r(r+1)/2] of z = P·x + c (see
/// router_kind::quadratic_topk); P read from `panels` when given (pack_router's).
inline matrix quadratic_features(const matrix& projection, const vector& projection_bias, const_matrix_ref x,
                                 const detail::panel_matrix* panels = nullptr) {
  matrix z;
  project(x, {detail::router_product(projection, panels, z)});
  z.rowwise() += projection_bias.transpose();
  const index_t rank = z.cols();
  matrix q(z.rows(), rank * (rank + 1) / 2);
  for (index_t t = 0; t < z.rows(); ++t)
    for (index_t i = 0, c = 0; i < rank; ++i)
      for (index_t j = i; j < rank; ++j) q(t, c++) = z(t, i) * z(t, j);
  return q;
}

/// The fitted scorers' scores s [T, E] before the softmax.
inline matrix fitted_scores(const router& r, const_matrix_ref x, const detail::packed_router* panels = nullptr) {
  using detail::packed_router;
  using detail::router_panels;
  matrix s, quad;
  project(x, {detail::router_product(r.weight, router_panels(panels, &packed_router::weight), s)});
  if (r.kind == router_kind::quadratic_topk && r.rank() > 0) {
    const matrix q = quadratic_features(r.projection, r.projection_bias, x, router_panels(panels, &packed_router::projection));
    project(q, {detail::router_product(r.weight_quad, router_panels(panels, &packed_router::weight_quad), quad)});
    s += quad;
  }
  if (r.bias.size()) s.rowwise() += r.bias.transpose();
  return s;
}

/// Router probabilities p [T, E] for tokens x [T, H] (not for router_kind::oracle,
/// which needs the layer's experts: see oracle_probs); with `panels`
/// (pack_router(r)), the same values read from them.
inline matrix router_probs(const router& r, const_matrix_ref x, const detail::packed_router* panels = nullptr) {
  using detail::packed_router;
  using detail::router_panels;
  moeforge::detail::require_shape(x, x.rows(), r.weight.cols(), "router input");
  if (r.kind == router_kind::oracle)
    throw config_error("router_probs: an oracle router scores with the layer's experts (runtime::select(layer, x))");
  matrix s, u;
  if (r.fitted())
    s = fitted_scores(r, x, panels);
  else if (r.kind == router_kind::cmoe_analytic)
    project(x, {detail::router_product(r.weight, router_panels(panels, &packed_router::weight), s),
                detail::router_product(r.weight_up, router_panels(panels, &packed_router::weight_up), u)});
  else
    project(x, {detail::router_product(r.weight, router_panels(panels, &packed_router::weight), s)});
  if (r.kind == router_kind::centroid_topk) {
    for (index_t t = 0; t < s.rows(); ++t) {
      const float n = std::sqrt(moeforge::detail::dot(x.row(t).data(), x.row(t).data(), x.cols()));
      s.row(t) *= n > 0.0f ? 1.0f / n : 0.0f;
    }
  }
  if (r.kind == router_kind::cmoe_analytic) {
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
    // A NaN orders nowhere: the selection would be arbitrary, and its weights NaN.
    if (!probs.row(t).allFinite())
      throw value_error(moeforge::detail::cat("router: token ", t, "'s expert probabilities hold a NaN or Inf (a NaN or Inf in its input, or scores that overflow)"));
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
      // Only softmax_topk weighs the outputs by p; the analytic, centroid and fitted routers select.
      float w = weighs_by_probability(r.kind) ? probs(t, index_t(ex)) : 1.0f;
      if (weighs_by_probability(r.kind) && r.renormalize) w /= sum;
      sel.weight[at] = w * r.scale;
    }
  }
  return sel;
}

/// Throws shape_error unless each of `sel`'s arrays holds k pairs per token;
/// returns the pairs.
inline std::size_t check_selection_arrays(const selection& sel, const char* what) {
  const auto pairs = std::size_t(std::max<index_t>(sel.tokens, 0)) * std::size_t(std::max<index_t>(sel.k, 0));
  if (sel.tokens < 0 || sel.k < 0 || sel.expert.size() != pairs || sel.prob.size() != pairs || sel.weight.size() != pairs || sel.work.size() != pairs)
    throw shape_error(moeforge::detail::cat(what, ": the selection's arrays do not hold k = ", sel.k, " pairs for each of its ", sel.tokens, " tokens"));
  return pairs;
}

/// Throws shape_error unless `sel` is a selection for layer m: k pairs per
/// token in each of its arrays, every expert index one of m's.
inline void check_selection(const moe_layer& m, const selection& sel, const char* what) {
  using moeforge::detail::cat;
  const std::size_t pairs = check_selection_arrays(sel, what);
  for (std::size_t i = 0; i < pairs; ++i)
    if (sel.expert[i] < 0 || sel.expert[i] >= m.num_experts())
      throw shape_error(cat(what, ": pair ", i, " of the selection names expert ", sel.expert[i], ", the layer has ", m.num_experts()));
}

/// Groups the selected pairs by expert; dropped pairs cost nothing because
/// they are not in the plan. Shared-expert multipliers come from `x`, the
/// selection's tokens. Throws shape_error for a selection made for other
/// tokens or another layer.
inline routing_plan make_plan(const moe_layer& m, const selection& sel, const_matrix_ref x) {
  check_selection(m, sel, "make_plan");
  if (sel.tokens != x.rows())
    throw shape_error(moeforge::detail::cat("make_plan: the selection is for ", sel.tokens, " tokens, the input has ", x.rows()));
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
      plan.shared_weight[s * std::size_t(sel.tokens) + std::size_t(t)] = moeforge::detail::sigmoid(moeforge::detail::dot(x.row(t).data(), m.shared[s].gate.data(), x.cols()));
  }
  return plan;
}

namespace detail {

/// apply_drop's marks, for a selection whose arrays and experts the policy
/// is known to fit (checked by the caller).
inline void mark_drops(const drop_policy& d, selection& sel) {
  const float t_major = d.kind == drop_kind::two_t ? std::max(0.0f, d.threshold - d.margin) : d.threshold;
  const float t_minor = d.kind == drop_kind::two_t ? d.threshold + d.margin : d.threshold;
  for (index_t t = 0; t < sel.tokens; ++t) {
    const std::size_t row = std::size_t(t * sel.k);
    float sum = 0.0f;
    for (index_t j = 0; j < sel.k; ++j) sum += sel.prob[row + std::size_t(j)];
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    float kept_mass = 0.0f;
    for (index_t j = 0; j < sel.k; ++j) {
      const std::size_t i = row + std::size_t(j);
      const float s = sel.prob[i] * inv;  // ŝ_j
      const float f = d.factor(index_t(sel.expert[i]));
      pair_work w = pair_work::full;
      switch (d.kind) {
        case drop_kind::none: break;
        case drop_kind::one_t: w = s >= t_minor * f ? pair_work::full : pair_work::dropped; break;
        case drop_kind::two_t:
          w = s >= t_minor * f ? pair_work::full : s >= t_major * f ? pair_work::major : pair_work::dropped;
          break;
        case drop_kind::naee: w = j == 0 || sel.prob[i] >= d.threshold * sel.prob[row] ? pair_work::full : pair_work::dropped; break;
        case drop_kind::top_p: w = j == 0 || kept_mass < d.threshold ? pair_work::full : pair_work::dropped; break;
      }
      kept_mass += s;
      sel.work[i] = w;
    }
  }
}

}  // namespace detail

/// Applies the router's drop policy to a top-k selection (DualSparse-MoE):
/// marks pairs dropped or major-only; kept pairs keep their gate weight.
inline void apply_drop(const drop_policy& d, selection& sel) {
  using moeforge::detail::cat;
  if (!d.active()) return;
  // Called without the layer (calibration, tests): what it reads must be there.
  const std::size_t pairs = check_selection_arrays(sel, "apply_drop");
  if (!d.expert_factor.empty())
    for (std::size_t i = 0; i < pairs; ++i)
      if (sel.expert[i] < 0 || std::size_t(sel.expert[i]) >= d.expert_factor.size())
        throw config_error(cat("apply_drop: pair ", i, " selects expert ", sel.expert[i], ", the drop policy has factors for ",
                               d.expert_factor.size(), " experts"));
  detail::mark_drops(d, sel);
}

/// What a batch's routing costs, in neuron-matrix products (one neuron of a
/// gated FFN is 3, of an ungated one 2, each H multiply-adds), so shared
/// experts, experts of different widths, major-only pairs and fitted routers
/// all count by their FLOPs.
struct route_stats {
  index_t tokens = 0;
  double shared = 0;    ///< by the shared experts
  double selected = 0;  ///< by the selected routed experts, computed in full
  double kept = 0;      ///< by the routed experts after dropping
  double router = 0;    ///< by a fitted router (its multiply-adds / H) or the oracle (every expert); the older kinds count 0
  double stored = 0;    ///< tokens × every neuron of the layer (what a dense layer of all of them costs)

  /// Dropped share of the layer's token-expert work (shared experts in the denominator).
  double drop_rate() const { return shared + selected > 0 ? (selected - kept) / (shared + selected) : 0.0; }
  /// Work computed (a fitted router's included) over the work of every stored neuron.
  double active_fraction() const { return stored > 0 ? (shared + kept + router) / stored : 0.0; }
  route_stats& operator+=(const route_stats& o) {
    tokens += o.tokens;
    shared += o.shared;
    selected += o.selected;
    kept += o.kept;
    router += o.router;
    stored += o.stored;
    return *this;
  }
};

/// Contiguous placement of E experts on D groups (expert e on group ⌊e·D/E⌋).
inline std::vector<index_t> contiguous_placement(index_t experts, index_t groups) {
  std::vector<index_t> g(static_cast<std::size_t>(experts));
  for (index_t e = 0; e < experts; ++e) g[std::size_t(e)] = e * groups / experts;
  return g;
}

/// Each group's neuron products for the pairs `sel` routes (expert e in group
/// placement[e]; novices cost nothing): every selected pair in full when
/// `routed`, else as the drop policy left it (full, major-only or dropped).
inline std::vector<double> group_work(const moe_layer& m, const selection& sel, const std::vector<index_t>& placement, index_t groups,
                                      bool routed) {
  using moeforge::detail::cat;
  check_selection(m, sel, "group_work");
  // Read by expert and written by group: a placement for other experts or past `groups` must not reach past either.
  if (index_t(placement.size()) != m.num_experts())
    throw config_error(cat("group_work: placement has ", placement.size(), " entries, the layer ", m.num_experts(), " experts"));
  for (std::size_t e = 0; e < placement.size(); ++e)
    if (placement[e] < 0 || placement[e] >= groups)
      throw config_error(cat("group_work: placement puts expert ", e, " on group ", placement[e], ", expected 0..", groups - 1));
  std::vector<double> load(static_cast<std::size_t>(groups), 0.0);
  for (std::size_t i = 0; i < sel.expert.size(); ++i) {
    const auto& e = m.experts[std::size_t(sel.expert[i])];
    if (e.is_novice()) continue;
    const double c = e.weights.neuron_cost();
    const auto w = routed ? pair_work::full : sel.work[i];
    const double neurons = w == pair_work::full ? double(e.width()) : w == pair_work::major ? double(e.major_width()) : 0.0;
    load[std::size_t(placement[std::size_t(sel.expert[i])])] += neurons * c;
  }
  return load;
}

/// The work of one dense FFN over `tokens` tokens (all of it shared: nothing is routed).
inline route_stats dense_stats(const ffn& f, index_t tokens) {
  route_stats r;
  r.tokens = tokens;
  r.shared = r.stored = double(tokens) * double(f.intermediate()) * f.neuron_cost();
  return r;
}

/// The work a selection asks of layer `m`. Novices cost nothing.
inline route_stats count_work(const moe_layer& m, const selection& sel) {
  check_selection(m, sel, "count_work");
  route_stats r;
  r.tokens = sel.tokens;
  const moe_token_work unit = token_work(m);
  r.shared = unit.shared * double(sel.tokens);
  r.stored = (unit.shared + unit.routed) * double(sel.tokens);
  r.router = unit.router * double(sel.tokens);
  for (std::size_t i = 0; i < sel.expert.size(); ++i) {
    const auto& e = m.experts[std::size_t(sel.expert[i])];
    if (e.is_novice()) continue;
    const double c = e.weights.neuron_cost();
    r.selected += double(e.width()) * c;
    if (sel.work[i] == pair_work::full) r.kept += double(e.width()) * c;
    if (sel.work[i] == pair_work::major) r.kept += double(e.major_width()) * c;
  }
  return r;
}

/// The activations h = act(gate·x) ⊙ (up·x) (ungated: act(up·x)) of `f`
/// for tokens x [T, H] → [T, I], by the kernel's products (thread-count independent).
inline matrix neuron_activations(const ffn& f, const_matrix_ref x) {
  matrix h = project(x, f.up);
  const matrix g = f.gated() ? project(x, f.gate) : matrix();
  for (index_t t = 0; t < h.rows(); ++t)
    activate_row(f.act, f.gated() ? g.row(t).data() : h.row(t).data(), f.gated() ? h.row(t).data() : nullptr, h.row(t).data(), h.cols());
  return h;
}

/// router_kind::oracle's probabilities: softmax over the routed experts of
/// ‖expert_e(x) − c_e‖, every expert computed (c: compensation means or 0).
inline matrix oracle_probs(const moe_layer& m, const_matrix_ref x) {
  moeforge::detail::require_shape(x, x.rows(), m.hidden(), "router input");
  matrix s(x.rows(), m.num_experts());
  for (index_t e = 0; e < m.num_experts(); ++e) {
    const auto& ex = m.experts[std::size_t(e)];
    matrix out = ex.is_novice() ? matrix(ex.novice.transpose().replicate(x.rows(), 1))
                                : project(neuron_activations(ex.weights, x), ex.weights.down);
    if (m.compensation.active()) out.rowwise() -= m.compensation.means.row(e);
    for (index_t t = 0; t < x.rows(); ++t) s(t, e) = std::sqrt(moeforge::detail::dot(out.row(t).data(), out.row(t).data(), out.cols()));
  }
  moeforge::detail::softmax_rows(s);
  return s;
}

/// The top-k selection of the layer's router for `x`, with its drop policy
/// applied; the router read from `panels` (pack_router's) when given.
inline selection select(const moe_layer& m, const_matrix_ref x, const detail::packed_router* panels = nullptr) {
  // The forward passes do not validate the whole layer, so the policy is
  // checked against it here: factors made for other experts, or a NaN threshold
  // (which would drop every pair), are refused.
  const bool drops = m.router.drop.active();
  if (drops) moeforge::validate(m.router.drop, m.num_experts(), "router.drop");
  selection sel = select_topk(m.router, m.router.kind == router_kind::oracle ? oracle_probs(m, x) : router_probs(m.router, x, panels));
  if (drops) detail::mark_drops(m.router.drop, sel);  // top-k's pairs name the layer's experts: nothing for apply_drop to check
  return sel;
}

/// The plan the layer's router makes for `x`: top-k, then its drop policy.
inline routing_plan route(const moe_layer& m, const_matrix_ref x, const detail::packed_router* panels = nullptr) {
  return make_plan(m, select(m, x, panels), x);
}

}  // namespace moeforge::runtime
