// DualSparse-MoE (arXiv 2508.18376) on any MoE model: exact partition into
// sub-experts, static neuron reconstruction (importance order, major/minor
// split), and a dynamic drop policy whose threshold is calibrated to a target
// drop rate, optionally with load-imbalance-aware per-group thresholds.
#pragma once

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/calib/expert_stats.hpp"
#include "moeforge/convert/driver.hpp"
#include "moeforge/convert/partition.hpp"
#include "moeforge/runtime/routing.hpp"

namespace moeforge::convert {

/// Whether one threshold serves every layer or each layer gets its own.
enum class drop_scope { global, layer };

inline std::string_view drop_scope_name(drop_scope s) { return s == drop_scope::global ? "global" : "layer"; }

inline drop_scope parse_drop_scope(std::string_view text) {
  if (text == "global") return drop_scope::global;
  if (text == "layer") return drop_scope::layer;
  throw config_error(moeforge::detail::cat("drop scope '", text, "': expected global or layer"));
}

struct dualsparse_options {
  /// Partial transformation: sub-experts per routed expert (1 = none).
  index_t partition = 1;
  /// Neuron importance that orders each expert (none: keep the original order).
  calib::importance_metric metric = calib::importance_metric::none;
  /// Share of each expert's neurons in its major sub-expert, in (0, 1].
  double major_fraction = 0.5;
  /// Drop policy: kind and, for 2t, margin. Its threshold comes from
  /// `threshold`, or is calibrated to `drop_rate`; naee with neither takes
  /// β = the median of p₂/p₁ on the calibration tokens (the NAEE paper's rule).
  drop_policy policy;
  std::optional<double> threshold;
  std::optional<double> drop_rate;  ///< target share of dropped work, in [0, 1)
  drop_scope scope = drop_scope::global;
  /// Load-aware thresholds over this many expert groups (0 or 1: off);
  /// `placement` gives each expert's group (empty: contiguous blocks).
  index_t groups = 0;
  std::vector<index_t> placement;
  /// Layer-scope calibration on the model transformed up to the previous layer
  /// (true) or on the untouched model (false). Global scope always calibrates
  /// on the untouched model: one threshold needs every layer's routing first.
  bool sequential = true;
  progress_fn progress;
};

namespace detail {

inline config_error dualsparse_no_moe_layer() {
  return config_error("dualsparse: the model has no MoE layer (convert it first with `moeforge convert cmoe`)");
}

inline double max_of(const std::vector<double>& v) { return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end()); }
inline double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / double(v.size());
}

}  // namespace detail

/// Per-group load of one layer on calibration tokens, in neuron-matrix
/// products (see runtime::route_stats): what each group of experts computes.
struct group_loads {
  std::vector<index_t> placement;   ///< [E] group of each expert
  std::vector<double> routed;       ///< [D] work routed to the group before any dropping
  std::vector<double> before;       ///< [D] work kept with one threshold for all
  std::vector<double> after;        ///< [D] work kept with the load-aware thresholds
  std::vector<float> factor;        ///< [D] multiplier of T per group (1 for loaded groups)
  double drop_rate_before = 0, drop_rate_after = 0;

  /// Most loaded group's work over the mean group's (1 = balanced).
  static double imbalance(const std::vector<double>& load) {
    const double mean = detail::mean_of(load);
    return mean > 0 ? detail::max_of(load) / mean : 0.0;
  }
  /// The layer's time under expert parallelism, modelled as its most loaded
  /// group's work relative to the most loaded group without dropping.
  double modelled_time(const std::vector<double>& load) const {
    const double full = detail::max_of(routed);
    return full > 0 ? detail::max_of(load) / full : 0.0;
  }
};

struct dualsparse_layer_report {
  index_t layer = 0;
  index_t partition = 1;
  std::string metric;
  double major_fraction = 0.5;
  drop_policy policy;
  std::optional<double> target_drop_rate;
  double drop_rate_calib = 0;  ///< realised on the calibration tokens with the final policy
  index_t tokens = 0;
  std::optional<group_loads> groups;
};

struct dualsparse_report {
  std::vector<dualsparse_layer_report> layers;
  drop_scope scope = drop_scope::global;
  double drop_rate_calib = 0;  ///< over every MoE layer's work
};

inline nlohmann::json to_json(const group_loads& g) {
  return {{"count", g.routed.size()},
          {"placement", g.placement},
          {"factor", g.factor},
          {"load_routed", g.routed},
          {"load_before", g.before},
          {"load_after", g.after},
          {"max_over_mean_routed", group_loads::imbalance(g.routed)},
          {"max_over_mean_before", group_loads::imbalance(g.before)},
          {"max_over_mean_after", group_loads::imbalance(g.after)},
          {"drop_rate_before", g.drop_rate_before},
          {"drop_rate_after", g.drop_rate_after},
          {"modelled_time_before", g.modelled_time(g.before)},
          {"modelled_time_after", g.modelled_time(g.after)}};
}

inline nlohmann::json to_json(const drop_policy& d) {
  nlohmann::json j{{"policy", std::string(drop_kind_name(d.kind))}, {"threshold", d.threshold}};
  if (d.kind == drop_kind::two_t) {
    j["margin"] = d.margin;
    j["t_major"] = std::max(0.0f, d.threshold - d.margin);
    j["t_minor"] = d.threshold + d.margin;
  }
  if (!d.expert_factor.empty()) j["expert_factor"] = d.expert_factor;
  return j;
}

/// The options as JSON (what a streamed conversion's resume must match).
inline nlohmann::json to_json(const dualsparse_options& o) {
  auto or_null = [](const std::optional<double>& v) { return v ? nlohmann::json(*v) : nlohmann::json(); };
  return {{"partition", o.partition},
          {"metric", std::string(calib::importance_name(o.metric))},
          {"major_fraction", o.major_fraction},
          {"drop", to_json(o.policy)},
          {"threshold", or_null(o.threshold)},
          {"drop_rate", or_null(o.drop_rate)},
          {"scope", std::string(drop_scope_name(o.scope))},
          {"groups", o.groups},
          {"placement", o.placement},
          {"sequential", o.sequential}};
}

inline nlohmann::json to_json(const dualsparse_layer_report& r) {
  nlohmann::json j{{"layer", r.layer},
                   {"partition", r.partition},
                   {"metric", r.metric},
                   {"major_fraction", r.major_fraction},
                   {"drop", to_json(r.policy)},
                   {"target_drop_rate", r.target_drop_rate ? nlohmann::json(*r.target_drop_rate) : nlohmann::json()},
                   {"drop_rate_calib", r.drop_rate_calib},
                   {"tokens", r.tokens}};
  if (r.groups) j["groups"] = to_json(*r.groups);
  return j;
}

inline nlohmann::json to_json(const dualsparse_report& r) {
  nlohmann::json layers = nlohmann::json::array();
  for (const auto& l : r.layers) layers.push_back(to_json(l));
  return {{"scope", std::string(drop_scope_name(r.scope))}, {"drop_rate_calib", r.drop_rate_calib}, {"layers", std::move(layers)}};
}

/// One layer's calibration routing: what threshold calibration and load
/// accounting need (the top-k choice without dropping).
struct routing_sample {
  moe_layer* layer = nullptr;
  runtime::selection selection;
};

/// The work a policy keeps on the samples, summed over them.
inline runtime::route_stats work_under(const std::vector<routing_sample>& samples, const drop_policy& policy) {
  runtime::route_stats total;
  for (const auto& s : samples) {
    runtime::selection sel = s.selection;
    runtime::apply_drop(policy, sel);
    total += runtime::count_work(*s.layer, sel);
  }
  return total;
}

/// The threshold of `policy`'s kind that brings the drop rate on the samples
/// closest to `target`. The rate is a step function of the threshold
/// (rising for 1t, 2t and naee, falling for top-p); bisection finds the step
/// that crosses the target, and the nearer side of it is returned, so the
/// realised rate is within one step (one token-expert pair's work) of it.
inline float calibrate_threshold(const std::vector<routing_sample>& samples, drop_policy policy, double target) {
  if (!(target >= 0.0 && target < 1.0))
    throw config_error(moeforge::detail::cat("dualsparse: drop rate ", target, ", expected a value in [0, 1)"));
  if (!policy.active()) throw config_error("dualsparse: a target drop rate needs a drop policy (1t, 2t, naee or top-p)");
  policy.expert_factor.clear();
  const bool rising = policy.kind != drop_kind::top_p;
  auto rate = [&](float t) {
    policy.threshold = t;
    return work_under(samples, policy).drop_rate();
  };
  // Invariant: rate(below) < target <= rate(above) in the rising direction.
  float lo = 0.0f, hi = 1.0f;
  const double at_lo = rate(lo), at_hi = rate(hi);
  if (rising ? at_lo >= target : at_hi >= target) return rising ? lo : hi;
  if (rising ? at_hi < target : at_lo < target) return rising ? hi : lo;
  for (int it = 0; it < 40; ++it) {
    const float mid = 0.5f * (lo + hi);
    if (mid <= lo || mid >= hi) break;
    const bool high_enough = rate(mid) >= target;
    if (high_enough == rising)
      hi = mid;
    else
      lo = mid;
  }
  const double r_lo = rate(lo), r_hi = rate(hi);
  return std::abs(r_lo - target) <= std::abs(r_hi - target) ? lo : hi;
}

/// Whether NAEE's β comes from calibration (no threshold or drop rate given):
/// it compares each token's second expert with its first, so a layer that
/// calibrates it needs top_k >= 2 (scope layer: every MoE layer; global: one).
inline bool naee_calibrates_beta(const dualsparse_options& o) { return o.policy.kind == drop_kind::naee && !o.threshold && !o.drop_rate; }
inline config_error naee_needs_two(const std::string& where) {
  return config_error(moeforge::detail::cat("dualsparse: naee needs top_k >= 2 in ", where,
                                            " (β compares the second expert with the first); give a threshold instead"));
}

/// NAEE's β: the median over calibration tokens of p₂/p₁ (top-2 router probabilities).
inline float naee_beta(const std::vector<routing_sample>& samples) {
  std::vector<float> ratio;
  for (const auto& s : samples) {
    const auto& sel = s.selection;
    if (sel.k < 2) continue;
    for (index_t t = 0; t < sel.tokens; ++t) {
      const float p1 = sel.prob[std::size_t(t * sel.k)];
      ratio.push_back(p1 > 0 ? sel.prob[std::size_t(t * sel.k + 1)] / p1 : 0.0f);
    }
  }
  if (ratio.empty()) throw naee_needs_two("some MoE layer");
  std::nth_element(ratio.begin(), ratio.begin() + std::ptrdiff_t(ratio.size() / 2), ratio.end());
  return ratio[ratio.size() / 2];
}

// Where DualSparse's groups come from and what they cost live in runtime/routing.hpp (expert parallelism uses them too).
using runtime::contiguous_placement;

/// Load-imbalance-aware thresholds (DualSparse §3.4): with r_d = routed
/// load of group d / the mean group load, groups with r_d ≥ 1 keep the base
/// threshold T and the others use T·r_d, so under-loaded groups drop less;
/// where T·r_d would have a group keep more work than the most loaded group
/// keeps with T (r_d just under 1 and a skewed share of the dropped pairs),
/// its factor is raised to the lowest that keeps it within that, found by
/// bisection on the calibration tokens (a group's kept work falls as its
/// factor rises, and at 1 it is within), so no group's work exceeds the most
/// loaded one's. Sets the policy's expert_factor and returns the loads
/// before and after. Throws config_error for a placement that does not put
/// each of the layer's experts on a group, or leaves a group 0..D-1 empty.
inline group_loads load_aware_thresholds(const moe_layer& m, const runtime::selection& sel, drop_policy& policy,
                                         const std::vector<index_t>& placement) {
  const index_t e_count = m.num_experts();
  if (index_t(placement.size()) != e_count)
    throw config_error(moeforge::detail::cat("dualsparse: placement has ", placement.size(), " entries, the layer ", e_count, " experts"));
  index_t groups = 0;
  for (index_t g : placement) {
    if (g < 0 || g >= e_count) throw config_error(moeforge::detail::cat("dualsparse: placement group ", g, ", expected 0..", e_count - 1));
    groups = std::max(groups, g + 1);
  }
  // An empty group would count in the mean load (see check_groups), and only when it is not the last.
  std::vector<char> used(std::size_t(groups), 0);
  for (index_t g : placement) used[std::size_t(g)] = 1;
  for (index_t g = 0; g < groups; ++g)
    if (!used[std::size_t(g)])
      throw config_error(moeforge::detail::cat("dualsparse: placement leaves group ", g, " of ", groups, " without an expert"));
  group_loads out;
  out.placement = placement;
  out.routed = runtime::group_work(m, sel, placement, groups, true);
  policy.expert_factor.clear();
  auto kept = [&](double& rate) {
    runtime::selection s = sel;
    runtime::apply_drop(policy, s);
    rate = runtime::count_work(m, s).drop_rate();
    return runtime::group_work(m, s, placement, groups, false);
  };
  out.before = kept(out.drop_rate_before);
  const double mean = detail::mean_of(out.routed), most = detail::max_of(out.before);
  out.factor.assign(std::size_t(groups), 1.0f);
  policy.expert_factor.assign(std::size_t(e_count), 1.0f);
  // A group's kept work depends on its own experts' thresholds only.
  const auto set_factor = [&](index_t g, float f) {
    out.factor[std::size_t(g)] = f;
    for (index_t e = 0; e < e_count; ++e)
      if (placement[std::size_t(e)] == g) policy.expert_factor[std::size_t(e)] = f;
  };
  const auto too_much = [&](index_t g, float f) {
    set_factor(g, f);
    double rate = 0;
    return kept(rate)[std::size_t(g)] > most;
  };
  for (index_t g = 0; g < groups; ++g) {
    if (!(mean > 0 && out.routed[std::size_t(g)] < mean)) continue;
    float low = float(out.routed[std::size_t(g)] / mean), high = 1.0f;
    if (too_much(g, low))
      while (true) {  // too_much(low), not too_much(high)
        const float mid = low + (high - low) / 2;
        if (mid <= low || mid >= high) break;
        (too_much(g, mid) ? low : high) = mid;
      }
    else
      high = low;
    set_factor(g, high);
  }
  out.after = kept(out.drop_rate_after);
  return out;
}

/// Static neuron reconstruction of one expert: neurons sorted by descending
/// importance (ties: lower index first), so the first `major` are the most
/// important. Output unchanged.
inline void reconstruct(routed_expert& e, const Eigen::VectorXd& importance) {
  std::vector<index_t> order(static_cast<std::size_t>(e.width()));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return importance[a] > importance[b]; });
  permute_neurons(e, order);
}

/// Major width for a fraction of `width` neurons: rounded, at least 1.
inline index_t major_width_for(index_t width, double fraction) {
  return std::clamp<index_t>(index_t(std::llround(fraction * double(width))), 1, width);
}

/// Throws config_error, naming the option, for options no model could use.
inline void validate(const dualsparse_options& o) {
  using moeforge::detail::cat;
  if (o.partition < 1) throw config_error(cat("dualsparse: partition P = ", o.partition, ", expected >= 1"));
  if (!(o.major_fraction > 0.0 && o.major_fraction <= 1.0))
    throw config_error(cat("dualsparse: major fraction ", o.major_fraction, ", expected a value in (0, 1]"));
  if (o.threshold && o.drop_rate) throw config_error("dualsparse: give a threshold or a target drop rate, not both");
  if (o.threshold && !(*o.threshold >= 0.0 && *o.threshold <= 1.0))
    throw config_error(cat("dualsparse: threshold ", *o.threshold, ", expected a value in [0, 1]"));
  if (o.drop_rate && !(*o.drop_rate >= 0.0 && *o.drop_rate < 1.0))
    throw config_error(cat("dualsparse: drop rate ", *o.drop_rate, ", expected a value in [0, 1)"));
  if (o.policy.kind == drop_kind::two_t && !(o.policy.margin >= 0.0f && std::isfinite(o.policy.margin)))
    throw config_error(cat("dualsparse: margin ", o.policy.margin,
                           ", expected a finite value >= 0 (T_major = T - margin must not exceed T_minor = T + margin)"));
  if (o.policy.active() && !o.threshold && !o.drop_rate && o.policy.kind != drop_kind::naee)
    throw config_error(cat("dualsparse: the ", drop_kind_name(o.policy.kind), " policy needs a threshold or a target drop rate"));
  if (!o.policy.active() && (o.threshold || o.drop_rate)) throw config_error("dualsparse: a threshold or drop rate needs a drop policy (1t, 2t, naee or top-p)");
  if (o.groups < 0) throw config_error(cat("dualsparse: groups = ", o.groups, ", expected >= 0"));
  if ((o.groups > 1 || !o.placement.empty()) && o.policy.kind != drop_kind::one_t && o.policy.kind != drop_kind::two_t)
    throw config_error("dualsparse: load-aware thresholds (groups) need the 1t or 2t policy");
}

/// Throws config_error unless a layer of `experts` routed experts can take
/// the options' load-aware groups and placement: a placement puts every
/// expert on one of the groups 0..D-1 (D = groups when given, else its
/// highest group + 1) and leaves none of them empty, which would count in
/// the mean load (the same experts on groups 0 and 3 of four would not be
/// balanced as on groups 0 and 1 of two).
inline void check_groups(const dualsparse_options& o, index_t experts, const std::string& where) {
  using moeforge::detail::cat;
  if (o.groups > experts) throw config_error(cat("dualsparse: groups = ", o.groups, " but ", where, " has only ", experts, " experts"));
  if (o.placement.empty()) return;
  if (index_t(o.placement.size()) != experts)
    throw config_error(cat("dualsparse: placement lists ", o.placement.size(), " experts, ", where, " has ", experts));
  const index_t highest = *std::max_element(o.placement.begin(), o.placement.end());
  const index_t groups = o.groups > 0 ? o.groups : std::max<index_t>(highest, 0) + 1;
  std::vector<char> used(std::size_t(groups), 0);
  for (std::size_t e = 0; e < o.placement.size(); ++e) {
    const index_t g = o.placement[e];
    if (g < 0 || g >= groups)
      throw config_error(cat("dualsparse: placement puts expert ", e, " on group ", g, ", expected 0..", groups - 1,
                             o.groups > 0 ? cat(" (groups = ", o.groups, ")") : std::string()));
    used[std::size_t(g)] = 1;
  }
  for (index_t g = 0; g < groups; ++g)
    if (!used[std::size_t(g)]) throw config_error(cat("dualsparse: placement leaves group ", g, " of ", groups, " without an expert"));
}

/// One MoE layer between the exact part and its drop policy: its report so
/// far and its calibration routing.
struct dualsparse_layer_result {
  dualsparse_layer_report report;
  routing_sample sample;
};

/// The exact part on one visited MoE layer: expert statistics on its
/// calibration inputs, neuron reconstruction, partition.
inline dualsparse_layer_result dualsparse_prepare(layer_visit& v, const dualsparse_options& opt) {
  auto& m = std::get<moe_layer>(v.ffn);
  v.stage("statistics");
  calib::expert_stats_options so;
  so.importance = opt.metric;
  calib::layer_stats st = calib::expert_statistics(m, v.inputs, so);
  v.stage("reconstruction");
  for (std::size_t e = 0; e < m.experts.size(); ++e) {
    auto& ex = m.experts[e];
    if (ex.is_novice()) continue;
    if (opt.metric != calib::importance_metric::none) reconstruct(ex, st.experts[e].importance);
    ex.major = major_width_for(ex.width(), opt.major_fraction);
  }
  partition_experts(m, opt.partition, moeforge::detail::cat("dualsparse: layer ", v.layer));
  dualsparse_layer_result out;
  auto& r = out.report;
  r.layer = v.layer;
  r.partition = opt.partition;
  r.metric = std::string(calib::importance_name(opt.metric));
  r.major_fraction = opt.major_fraction;
  r.target_drop_rate = opt.drop_rate;
  r.tokens = st.tokens;
  out.sample = {&m, std::move(st.selection)};
  return out;
}

/// The options' policy with its threshold for these samples (one layer's, or all of them).
inline drop_policy base_policy(const std::vector<routing_sample>& samples, const dualsparse_options& opt) {
  drop_policy p = opt.policy;
  p.expert_factor.clear();
  if (opt.threshold) p.threshold = float(*opt.threshold);
  else if (opt.drop_rate) p.threshold = calibrate_threshold(samples, p, *opt.drop_rate);
  else if (p.kind == drop_kind::naee) p.threshold = naee_beta(samples);
  return p;
}

/// Puts `base` (with load-aware factors when the options ask) on the layer's router.
inline void dualsparse_finish(dualsparse_layer_result& x, const drop_policy& base, const dualsparse_options& opt) {
  auto& r = x.report;
  moe_layer& m = *x.sample.layer;
  r.policy = base;
  if (opt.groups > 1 || !opt.placement.empty()) {
    const auto placement = opt.placement.empty() ? contiguous_placement(m.num_experts(), opt.groups) : opt.placement;
    r.groups = load_aware_thresholds(m, x.sample.selection, r.policy, placement);
  }
  m.router.drop = r.policy;
  r.drop_rate_calib = work_under({x.sample}, r.policy).drop_rate();
}

/// DualSparse-MoE on one visited MoE layer with its own threshold (scope
/// layer): the per-layer method that dualsparse_model and the streamed
/// conversion (stream.hpp) share. Global scope needs every layer's routing
/// first, so it has no per-layer method.
inline dualsparse_layer_result dualsparse_layer(layer_visit& v, const dualsparse_options& opt) {
  if (opt.scope != drop_scope::layer)
    throw config_error("dualsparse: scope global calibrates one threshold on every MoE layer's routing; one layer alone needs scope layer");
  dualsparse_layer_result x = dualsparse_prepare(v, opt);
  v.stage("thresholds");
  dualsparse_finish(x, base_policy({x.sample}, opt), opt);
  return x;
}

/// DualSparse-MoE on every MoE layer of `w`, in place: reconstruction and
/// partition (exact), then the drop policy with its calibrated threshold.
/// All layers are checked before any is changed.
inline dualsparse_report dualsparse_model(model::weights& w, const ffn_inputs_fn& inputs, const dualsparse_options& opt) {
  using moeforge::detail::cat;
  validate(opt);
  index_t moe_layers = 0, top2_layers = 0;
  for (std::size_t l = 0; l < w.layers.size(); ++l)
    if (const auto* m = std::get_if<moe_layer>(&w.layers[l].ffn)) {
      ++moe_layers;
      check_partition(*m, opt.partition, cat("dualsparse: layer ", l));
      check_groups(opt, m->num_experts(), cat("layer ", l));
      if (m->router.top_k >= 2) ++top2_layers;
      else if (naee_calibrates_beta(opt) && opt.scope == drop_scope::layer) throw naee_needs_two(cat("layer ", l));
    }
  if (moe_layers == 0) throw detail::dualsparse_no_moe_layer();
  if (naee_calibrates_beta(opt) && top2_layers == 0) throw naee_needs_two("some MoE layer");
  // The method sets every layer's policy anew, calibrated on routing without
  // the model's old ones (a sparsified model sparsified again).
  for (auto& layer : w.layers)
    if (auto* m = std::get_if<moe_layer>(&layer.ffn)) m->router.drop = {};

  std::vector<dualsparse_layer_result> layers;
  layers.reserve(std::size_t(moe_layers));
  visit_options vo;
  vo.filter = layer_filter::moe;
  vo.progress = opt.progress;
  vo.sequential = opt.scope == drop_scope::layer && opt.sequential;
  visit_layers(w, inputs, vo, [&](layer_visit& v, double) {
    layers.push_back(opt.scope == drop_scope::layer ? dualsparse_layer(v, opt) : dualsparse_prepare(v, opt));
  });
  if (opt.scope == drop_scope::global) {
    std::vector<routing_sample> samples;
    for (const auto& x : layers) samples.push_back(x.sample);
    const drop_policy base = base_policy(samples, opt);
    for (auto& x : layers) dualsparse_finish(x, base, opt);
  }
  dualsparse_report rep;
  rep.scope = opt.scope;
  runtime::route_stats total;
  for (auto& x : layers) {
    runtime::selection sel = x.sample.selection;
    runtime::apply_drop(x.sample.layer->router.drop, sel);
    total += runtime::count_work(*x.sample.layer, sel);
    rep.layers.push_back(std::move(x.report));
  }
  rep.drop_rate_calib = total.drop_rate();
  return rep;
}

}  // namespace moeforge::convert
