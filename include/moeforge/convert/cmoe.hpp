// CMoE (arXiv 2502.04416): one dense gated FFN -> a MoE layer with one shared
// expert, balanced marker-clustered routed experts and the analytic router.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/calib/markers.hpp"
#include "moeforge/convert/assignment.hpp"
#include "moeforge/core/moe.hpp"
#include "moeforge/model/weights.hpp"

namespace moeforge::convert {

/// `S{shared}A{active}E{experts}`.
struct cmoe_config {
  index_t shared = 0;
  index_t active = 1;
  index_t experts = 1;
};

inline std::string to_string(const cmoe_config& c) { return moeforge::detail::cat("S", c.shared, "A", c.active, "E", c.experts); }

/// Parses "S3A3E8" (case-sensitive); throws config_error naming the text.
inline cmoe_config parse_cmoe_config(const std::string& text) {
  cmoe_config c;
  std::size_t at = 0;
  auto number = [&](char tag) -> index_t {
    if (at >= text.size() || text[at] != tag)
      throw config_error(moeforge::detail::cat("cmoe config '", text, "': expected '", tag, "' at position ", at, " (form S{shared}A{active}E{experts}, e.g. S3A3E8)"));
    const std::size_t start = ++at;
    index_t v = 0;
    while (at < text.size() && text[at] >= '0' && text[at] <= '9' && at - start < 9) v = v * 10 + (text[at++] - '0');
    if (at == start) throw config_error(moeforge::detail::cat("cmoe config '", text, "': expected a number after '", tag, "'"));
    return v;
  };
  c.shared = number('S');
  c.active = number('A');
  c.experts = number('E');
  if (at != text.size()) throw config_error(moeforge::detail::cat("cmoe config '", text, "': unexpected text after the expert count"));
  return c;
}

enum class leftover_policy { drop, shared };
/// cmoe: marker clustering; random: seeded random equal split (LLaMA-MoE style)
/// with the same shared expert and analytic router, so only the grouping differs.
enum class cmoe_method { cmoe, random };

inline std::string_view leftover_name(leftover_policy p) { return p == leftover_policy::drop ? "drop" : "shared"; }
inline std::string_view method_name(cmoe_method m) { return m == cmoe_method::cmoe ? "cmoe" : "random"; }

struct cmoe_progress {
  std::string stage;  ///< "markers", "assignment", "experts"
  double seconds = 0; ///< since the conversion started
};

struct cmoe_options {
  cmoe_config config;
  index_t ka = 10;            ///< markers per token (count) ...
  double ka_fraction = 0.0;   ///< ... or, when > 0, this fraction of I (rounded, at least 1)
  leftover_policy leftover = leftover_policy::drop;
  cmoe_method method = cmoe_method::cmoe;
  /// Assignment passes. After the first, centroids become the members'
  /// majority vote (mean rounded at 1/2), which keeps costs integral Hamming distances.
  index_t iterations = 1;
  std::uint64_t seed = 0;     ///< random method only
  index_t block = 256;        ///< calibration tokens per marker block
  std::function<void(const cmoe_progress&)> progress;
};

struct cmoe_report {
  cmoe_config config;
  std::string method;
  index_t neurons = 0, per_expert = 0, tokens = 0, ka = 0;
  std::vector<index_t> shared;                 ///< shared expert's neurons (ascending)
  std::vector<std::vector<index_t>> experts;   ///< routed experts' neurons (ascending)
  std::vector<index_t> representatives;
  std::vector<index_t> leftovers;
  std::string leftover_fate;                   ///< "none", "dropped" or "shared"
  std::int64_t assignment_cost = 0;            ///< total Hamming distance to the final pass's centroids
  double rate_min = 0, rate_median = 0, rate_max = 0, rate_p90 = 0;
  std::vector<std::pair<std::string, double>> stage_seconds;
};

inline nlohmann::json to_json(const cmoe_report& r) {
  nlohmann::json j;
  j["config"] = to_string(r.config);
  j["method"] = r.method;
  j["neurons"] = r.neurons;
  j["per_expert"] = r.per_expert;
  j["shared"] = r.shared;
  j["experts"] = nlohmann::json::array();
  for (std::size_t e = 0; e < r.experts.size(); ++e)
    j["experts"].push_back({{"neurons", r.experts[e]}, {"representative", r.representatives[e]}});
  j["leftovers"] = {{"neurons", r.leftovers}, {"fate", r.leftover_fate}};
  j["assignment_cost"] = r.assignment_cost;
  j["markers"] = {{"tokens", r.tokens}, {"ka", r.ka}, {"rate_min", r.rate_min}, {"rate_median", r.rate_median},
                  {"rate_p90", r.rate_p90}, {"rate_max", r.rate_max}};
  j["stage_seconds"] = nlohmann::json::object();
  for (const auto& [stage, s] : r.stage_seconds) j["stage_seconds"][stage] = s;
  return j;
}

struct cmoe_result {
  moe_layer layer;
  cmoe_report report;
};

/// K_a as a count for a layer of `neurons` neurons; throws config_error when out of range.
inline index_t resolve_ka(const cmoe_options& o, index_t neurons) {
  if (o.ka_fraction != 0.0) {
    if (!(o.ka_fraction > 0.0 && o.ka_fraction <= 1.0))
      throw config_error(moeforge::detail::cat("cmoe: K_a fraction ", o.ka_fraction, " must be in (0, 1]"));
    return std::max<index_t>(1, index_t(std::llround(o.ka_fraction * double(neurons))));
  }
  if (o.ka < 1 || o.ka > neurons)
    throw config_error(moeforge::detail::cat("cmoe: K_a = ", o.ka, ", expected 1..", neurons, " (the FFN's neurons)"));
  return o.ka;
}

/// Throws config_error unless the configuration fits a layer of `neurons` neurons.
inline void validate(const cmoe_config& c, index_t neurons) {
  const std::string name = to_string(c);
  if (c.experts < 1) throw config_error(moeforge::detail::cat("cmoe config ", name, ": needs at least one expert"));
  if (c.experts > neurons)
    throw config_error(moeforge::detail::cat("cmoe config ", name, ": ", c.experts, " experts but the FFN has only ", neurons, " neurons"));
  if (c.shared >= c.experts)
    throw config_error(moeforge::detail::cat("cmoe config ", name, ": ", c.shared, " shared of ", c.experts, " experts leaves no routed expert"));
  if (c.active < 1 || c.active > c.experts - c.shared)
    throw config_error(moeforge::detail::cat("cmoe config ", name, ": ", c.active, " active experts, expected 1..", c.experts - c.shared, " (the routed experts)"));
}

namespace detail {

using clock = std::chrono::steady_clock;

// Hamming distance between two bit columns of `words` words.
inline std::int64_t hamming(const std::uint64_t* a, const std::uint64_t* b, index_t words) {
  std::int64_t d = 0;
  for (index_t w = 0; w < words; ++w) d += calib::detail::popcount64(a[w] ^ b[w]);
  return d;
}

// Per-token member counts of a cluster (how many members are marked on token t).
inline std::vector<std::int32_t> token_counts(const calib::markers& mk, const std::vector<index_t>& members) {
  std::vector<std::int32_t> cnt(static_cast<std::size_t>(mk.tokens), 0);
  for (index_t i : members) {
    const std::uint64_t* c = mk.column(i);
    for (index_t w = 0; w < mk.words; ++w)
      for (std::uint64_t v = c[w]; v; v &= v - 1) ++cnt[std::size_t(w * 64 + __builtin_ctzll(v))];
  }
  return cnt;
}

// m·L1(b, mean) = Σ_t cnt_t + Σ_{t: b_t=1} (m − 2·cnt_t); the first sum is the
// same for every member, so the member with the smallest second sum is closest.
inline index_t representative(const calib::markers& mk, const std::vector<index_t>& members) {
  const auto cnt = token_counts(mk, members);
  const std::int64_t m = std::int64_t(members.size());
  index_t best = -1;
  std::int64_t best_score = 0;
  for (index_t i : members) {
    std::int64_t s = 0;
    const std::uint64_t* c = mk.column(i);
    for (index_t w = 0; w < mk.words; ++w)
      for (std::uint64_t v = c[w]; v; v &= v - 1) s += m - 2 * cnt[std::size_t(w * 64 + __builtin_ctzll(v))];
    if (best < 0 || s < best_score || (s == best_score && i < best)) best = i, best_score = s;
  }
  return best;
}

// Majority-vote centroid bits (a token is set when at least half the members are marked).
inline std::vector<std::uint64_t> majority(const calib::markers& mk, const std::vector<index_t>& members) {
  const auto cnt = token_counts(mk, members);
  std::vector<std::uint64_t> bits(static_cast<std::size_t>(mk.words), 0);
  for (index_t t = 0; t < mk.tokens; ++t)
    if (2 * std::int64_t(cnt[std::size_t(t)]) >= std::int64_t(members.size())) bits[std::size_t(t / 64)] |= std::uint64_t(1) << (t % 64);
  return bits;
}

// Balanced Hamming clustering of `pool` into k groups of m (one or more passes).
inline std::vector<std::vector<index_t>> cluster_markers(const calib::markers& mk, const std::vector<index_t>& pool, index_t k,
                                                         index_t m, index_t iterations, std::int64_t& cost) {
  // Initial centroids: the k highest-rate neurons of the pool (pool is rate-ordered).
  std::vector<std::vector<std::uint64_t>> cent(static_cast<std::size_t>(k));
  for (index_t j = 0; j < k; ++j) cent[std::size_t(j)].assign(mk.column(pool[std::size_t(j)]), mk.column(pool[std::size_t(j)]) + mk.words);
  const index_t n = index_t(pool.size());
  std::vector<std::vector<index_t>> groups;
  for (index_t it = 0; it < std::max<index_t>(1, iterations); ++it) {
    std::vector<std::int64_t> c(static_cast<std::size_t>(n * k));
#pragma omp parallel for schedule(static)
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < k; ++j) c[std::size_t(i * k + j)] = hamming(mk.column(pool[std::size_t(i)]), cent[std::size_t(j)].data(), mk.words);
    const auto res = balanced_assignment<std::int64_t>(n, std::vector<index_t>(std::size_t(k), m),
                                                       [&](index_t i, index_t j) { return c[std::size_t(i * k + j)]; });
    cost = res.total;
    groups.assign(std::size_t(k), {});
    for (index_t i = 0; i < n; ++i) groups[std::size_t(res.cluster[std::size_t(i)])].push_back(pool[std::size_t(i)]);
    for (auto& g : groups) std::sort(g.begin(), g.end());
    if (it + 1 < iterations)
      for (index_t j = 0; j < k; ++j) cent[std::size_t(j)] = majority(mk, groups[std::size_t(j)]);
  }
  return groups;
}

// splitmix64: a portable generator, so the random split is the same everywhere.
inline std::uint64_t splitmix(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline std::vector<std::vector<index_t>> random_split(std::vector<index_t> pool, index_t k, index_t m, std::uint64_t seed) {
  for (std::size_t i = pool.size(); i > 1; --i) std::swap(pool[i - 1], pool[std::size_t(splitmix(seed) % i)]);
  std::vector<std::vector<index_t>> groups(static_cast<std::size_t>(k));
  for (index_t j = 0; j < k; ++j) {
    groups[std::size_t(j)].assign(pool.begin() + j * m, pool.begin() + (j + 1) * m);
    std::sort(groups[std::size_t(j)].begin(), groups[std::size_t(j)].end());
  }
  return groups;
}

inline double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v[std::size_t(std::llround(q * double(v.size() - 1)))];
}

}  // namespace detail

/// CMoE from precomputed markers of `dense`.
inline cmoe_result cmoe(const ffn& dense, const calib::markers& mk, const cmoe_options& opt) {
  validate(dense, "cmoe: dense ffn");
  if (!dense.gated()) throw config_error("cmoe: the FFN has no gate projection (CMoE needs a gated FFN)");
  const index_t neurons = dense.intermediate();
  validate(opt.config, neurons);
  if (mk.neurons != neurons)
    throw shape_error(moeforge::detail::cat("cmoe: markers cover ", mk.neurons, " neurons, the FFN has ", neurons));
  if (mk.tokens == 0) throw config_error("cmoe: zero calibration tokens");
  if (opt.iterations < 1) throw config_error(moeforge::detail::cat("cmoe: iterations = ", opt.iterations, ", expected >= 1"));
  const auto start = detail::clock::now();
  auto seconds = [&] { return std::chrono::duration<double>(detail::clock::now() - start).count(); };
  auto report_stage = [&](const char* stage) {
    if (opt.progress) opt.progress(cmoe_progress{stage, seconds()});
  };

  const cmoe_config& c = opt.config;
  const index_t m = neurons / c.experts;
  const index_t k = c.experts - c.shared;
  cmoe_result out;
  cmoe_report& rep = out.report;
  rep.config = c;
  rep.method = std::string(method_name(opt.method));
  rep.neurons = neurons;
  rep.per_expert = m;
  rep.tokens = mk.tokens;
  rep.ka = mk.ka;

  const auto order = calib::neurons_by_rate(mk);
  rep.shared.assign(order.begin(), order.begin() + c.shared * m);
  const std::vector<index_t> pool(order.begin() + c.shared * m, order.begin() + c.experts * m);
  rep.leftovers.assign(order.begin() + c.experts * m, order.end());
  std::sort(rep.leftovers.begin(), rep.leftovers.end());
  rep.leftover_fate = rep.leftovers.empty() ? "none" : opt.leftover == leftover_policy::drop ? "dropped" : "shared";
  if (opt.leftover == leftover_policy::shared) rep.shared.insert(rep.shared.end(), rep.leftovers.begin(), rep.leftovers.end());
  std::sort(rep.shared.begin(), rep.shared.end());

  const double t_assign = seconds();
  if (opt.method == cmoe_method::cmoe) {
    rep.experts = detail::cluster_markers(mk, pool, k, m, opt.iterations, rep.assignment_cost);
  } else {
    rep.experts = detail::random_split(pool, k, m, opt.seed);
  }
  rep.stage_seconds.emplace_back("assignment", seconds() - t_assign);
  report_stage("assignment");

  const double t_router = seconds();
  moe_layer& layer = out.layer;
  layer.router.kind = router_kind::cmoe_analytic;
  layer.router.top_k = c.active;
  layer.router.scale = 1.0f;
  layer.router.weight.resize(k, dense.hidden());
  layer.router.weight_up.resize(k, dense.hidden());
  rep.representatives.resize(std::size_t(k));
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t j = 0; j < k; ++j) rep.representatives[std::size_t(j)] = detail::representative(mk, rep.experts[std::size_t(j)]);
  for (index_t j = 0; j < k; ++j) {
    const index_t r = rep.representatives[std::size_t(j)];
    layer.router.weight.row(j) = dense.gate.row(r).normalized();
    layer.router.weight_up.row(j) = dense.up.row(r).normalized();
  }
  rep.stage_seconds.emplace_back("router", seconds() - t_router);
  const double t_experts = seconds();
  layer.experts.resize(std::size_t(k));
  for (index_t j = 0; j < k; ++j) layer.experts[std::size_t(j)].weights = select_neurons(dense, rep.experts[std::size_t(j)]);
  if (!rep.shared.empty()) layer.shared.push_back(shared_expert{select_neurons(dense, rep.shared), vector()});
  rep.stage_seconds.emplace_back("experts", seconds() - t_experts);
  report_stage("experts");

  std::vector<double> rates(static_cast<std::size_t>(neurons));
  for (index_t i = 0; i < neurons; ++i) rates[std::size_t(i)] = mk.rate(i);
  rep.rate_min = detail::quantile(rates, 0.0);
  rep.rate_median = detail::quantile(rates, 0.5);
  rep.rate_p90 = detail::quantile(rates, 0.9);
  rep.rate_max = detail::quantile(rates, 1.0);
  validate(layer, "cmoe layer");
  return out;
}

/// CMoE from calibration inputs x [T, H] (the FFN's inputs, i.e. after the
/// post-attention RMSNorm). Neurons inside each expert are in ascending index order.
inline cmoe_result cmoe(const ffn& dense, const_matrix_ref x, const cmoe_options& opt) {
  validate(dense, "cmoe: dense ffn");
  validate(opt.config, dense.intermediate());
  if (x.rows() == 0) throw config_error("cmoe: zero calibration tokens");
  const index_t ka = resolve_ka(opt, dense.intermediate());
  const auto start = detail::clock::now();
  const calib::markers mk = calib::compute_markers(dense, x, ka, opt.block);
  const double t_markers = std::chrono::duration<double>(detail::clock::now() - start).count();
  if (opt.progress) opt.progress(cmoe_progress{"markers", t_markers});
  cmoe_result out = cmoe(dense, mk, opt);
  out.report.stage_seconds.insert(out.report.stage_seconds.begin(), {"markers", t_markers});
  return out;
}

/// The calibration inputs [T, H] of layer `l`'s FFN, computed by running the
/// model as it is now (layers 0..l-1 already converted) on the calibration
/// tokens, e.g. with the transformer's FFN-input hook and stop-after-layer.
using ffn_inputs_fn = std::function<matrix(const model::weights&, index_t layer)>;

struct cmoe_model_progress {
  index_t layer = 0, layers = 0;
  std::string stage;   ///< "calibration", then the cmoe stages, then "done"
  double seconds = 0;  ///< since the model's conversion started
};

/// Converts every dense layer of `w` in place, in layer order; returns one report per layer (empty for layers already MoE).
inline std::vector<cmoe_report> cmoe_model(model::weights& w, const ffn_inputs_fn& inputs, const cmoe_options& opt,
                                           const std::function<void(const cmoe_model_progress&)>& progress = {}) {
  const index_t layers = index_t(w.layers.size());
  for (index_t l = 0; l < layers; ++l)
    if (const ffn* f = std::get_if<ffn>(&w.layers[std::size_t(l)].ffn)) {
      validate(opt.config, f->intermediate());
      resolve_ka(opt, f->intermediate());
    }
  const auto start = detail::clock::now();
  auto tell = [&](index_t l, const std::string& stage) {
    if (progress) progress(cmoe_model_progress{l, layers, stage, std::chrono::duration<double>(detail::clock::now() - start).count()});
  };
  std::vector<cmoe_report> reports(static_cast<std::size_t>(layers));
  for (index_t l = 0; l < layers; ++l) {
    const ffn* f = std::get_if<ffn>(&w.layers[std::size_t(l)].ffn);
    if (!f) continue;
    tell(l, "calibration");
    const matrix x = inputs(w, l);
    cmoe_options layer_opt = opt;
    layer_opt.progress = [&](const cmoe_progress& p) { tell(l, p.stage); };
    cmoe_result res = cmoe(*f, x, layer_opt);
    reports[std::size_t(l)] = std::move(res.report);
    w.layers[std::size_t(l)].ffn = std::move(res.layer);
    tell(l, "done");
  }
  return reports;
}

}  // namespace moeforge::convert
