// CMoE (arXiv 2502.04416): one dense gated FFN -> a MoE layer with one shared
// expert, balanced marker-clustered routed experts and the analytic router;
// the random-split and parameter-clustering baselines; whole-model conversion.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/calib/markers.hpp"
#include "moeforge/convert/assignment.hpp"
#include "moeforge/convert/cmoe_fit.hpp"
#include "moeforge/convert/driver.hpp"
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

/// What happens to the I mod N neurons that no expert of exactly m = I / N
/// neurons takes. Which neurons those are is decided by the assignment itself
/// (see cmoe_method::cmoe); the policy only decides their fate.
enum class leftover_policy {
  drop,    ///< removed from the layer, as the reference code does
  shared,  ///< added to the shared expert (always on): exact at full activation
};

/// How the routed experts are formed. All methods share the shared-expert
/// choice (highest marker rate) and the leftover policy.
enum class cmoe_method {
  /// CMoE: exact balanced clustering of the activation markers (Hamming cost
  /// to the highest-rate neurons), analytic router from representative neurons.
  cmoe,
  /// LLaMA-MoE-style baseline: a seeded random equal split, same analytic router.
  random,
  /// MoEfication-style baseline: balanced k-means on the L2-normalised gate
  /// rows, router = the clusters' centroids (router_kind::centroid_topk).
  param_cluster,
};

inline std::string_view leftover_name(leftover_policy p) { return p == leftover_policy::drop ? "drop" : "shared"; }
inline std::string_view method_name(cmoe_method m) {
  switch (m) {
    case cmoe_method::cmoe: return "cmoe";
    case cmoe_method::random: return "random";
    case cmoe_method::param_cluster: return "param_cluster";
  }
  return "?";
}

/// Parses "drop" or "shared"; throws config_error naming the text.
inline leftover_policy parse_leftover_policy(const std::string& text) {
  for (auto p : {leftover_policy::drop, leftover_policy::shared})
    if (text == leftover_name(p)) return p;
  throw config_error(moeforge::detail::cat("cmoe leftover policy '", text, "': expected 'shared' or 'drop'"));
}

/// Parses "cmoe", "random" or "param_cluster"; throws config_error naming the text.
inline cmoe_method parse_cmoe_method(const std::string& text) {
  for (auto m : {cmoe_method::cmoe, cmoe_method::random, cmoe_method::param_cluster})
    if (text == method_name(m)) return m;
  throw config_error(moeforge::detail::cat("cmoe method '", text, "': expected 'cmoe', 'random' or 'param_cluster'"));
}

/// Progress of one layer's conversion: `stage` is the stage that starts now
/// ("markers", "assignment", "router", "experts").
struct cmoe_progress {
  std::string stage;
  double seconds = 0;  ///< since this layer's conversion started
};

struct cmoe_options {
  cmoe_config config;
  index_t ka = 10;            ///< markers per token (count) ...
  double ka_fraction = 0.0;   ///< ... or, when > 0, this fraction of I (rounded, at least 1)
  leftover_policy leftover = leftover_policy::shared;
  cmoe_method method = cmoe_method::cmoe;
  /// cmoe: assignment passes (the reference does 1). Each later pass moves the
  /// centroids to their members' mean marker vector (exact integer L1 costs)
  /// and stops early when the assignment repeats.
  index_t iterations = 1;
  /// param_cluster: balanced k-means passes (stops early when the assignment repeats).
  index_t cluster_iterations = 20;
  std::uint64_t seed = 0;     ///< random split; param_cluster's k-means++ start
  index_t block = 1024;       ///< calibration tokens per marker block (rounded up to a multiple of 64)
  /// Router fitting, novice compensation and refit (cmoe_fit.hpp). The
  /// default is the published method (analytic router, nothing fitted), so
  /// code that asks for CMoE gets the paper's algorithm; see cmoe_preset.
  fit_options fit;
  std::function<void(const cmoe_progress&)> progress;
};

/// Named recipes: "paper" is the published method (analytic router, no
/// compensation, no refit; moeforge's leftover default `shared`), "best" the
/// most accurate recipe moeforge has measured on stories260K (README, CMoE):
/// quadratic router (rank 16), novice compensation, refit of the down
/// projections, then 100 steps of layer-local distillation (300 steps gain a
/// little more for 3× the time; see README) — with the size rule on
/// (fit_options::size_rule): a layer as small as stories260K's gets every
/// step on every calibration token; a wide one fits its router and
/// compensation on the first max(4096, 2^36/(H·I)) tokens and skips the
/// refit above 4096 neurons and distillation above 2^36 multiply-adds, so a
/// LLaMA-7B layer converts in under 3× the paper's time and 1.5 GB above its
/// weights (moeforge-bench convert --preset best).
enum class cmoe_preset { paper, best };

inline std::string_view preset_name(cmoe_preset p) { return p == cmoe_preset::paper ? "paper" : "best"; }

/// Parses "paper" or "best"; throws config_error naming the text.
inline cmoe_preset parse_cmoe_preset(const std::string& text) {
  for (auto p : {cmoe_preset::paper, cmoe_preset::best})
    if (text == preset_name(p)) return p;
  throw config_error(moeforge::detail::cat("cmoe preset '", text, "': expected 'paper' or 'best'"));
}

/// The fitting steps of a preset (the partition options are the same for both).
inline fit_options preset_fit(cmoe_preset p) {
  fit_options f;
  if (p == cmoe_preset::best) {
    f.router = router_fit::quadratic;
    f.rank = 16;
    f.compensate = compensation_mode::novice;
    f.refit = refit_mode::down;
    f.distill_steps = 100;
    f.distill_lr = 3e-3;
    f.size_rule = true;
  }
  return f;
}

struct cmoe_report {
  cmoe_config config;
  std::string method;
  index_t neurons = 0, per_expert = 0, tokens = 0, ka = 0;
  std::vector<index_t> shared;                 ///< shared expert's neurons (ascending; leftovers included when shared)
  std::vector<std::vector<index_t>> experts;   ///< routed experts' neurons (ascending)
  std::vector<index_t> representatives;        ///< [experts] the router's neuron per expert (empty for param_cluster)
  std::vector<index_t> leftovers;              ///< the I mod N neurons no routed expert took (ascending)
  std::string leftover_fate;                   ///< "none", "dropped" or "shared"
  /// cmoe: total Hamming distance of the first (the reference's only)
  /// assignment pass, leftovers costing 0 — what the reference's LAP minimises.
  std::int64_t assignment_cost = 0;
  /// Per pass: total distance of the assigned neurons to that pass's centroids
  /// (cmoe: L1 between marker vectors; param_cluster: squared L2).
  std::vector<double> pass_costs;
  double rate_min = 0, rate_median = 0, rate_max = 0, rate_p90 = 0;
  std::vector<std::pair<std::string, double>> stage_seconds;
  fit_options fit;       ///< the fitting recipe this layer was converted with
  fit_report fit_steps;  ///< calibration error after each fitting step (empty for the paper's method)
};

/// A fitting recipe as JSON: every field, `rank` whatever the router (the
/// resume fingerprint of a streamed conversion has always recorded it).
inline nlohmann::json to_json(const fit_options& f) {
  return {{"router", std::string(router_fit_name(f.router))},
          {"rank", f.rank},
          {"compensate", std::string(compensation_name(f.compensate))},
          {"refit", std::string(refit_name(f.refit))},
          {"rounds", f.rounds},
          {"router_ridge", f.router_ridge},
          {"refit_ridge", f.refit_ridge},
          {"distill_steps", f.distill_steps},
          {"distill_lr", f.distill_lr},
          {"size_rule", f.size_rule}};
}

/// The options of a CMoE conversion as JSON: what a streamed conversion's
/// resume must match, and what the CLI records as provenance.
inline nlohmann::json to_json(const cmoe_options& o) {
  return {{"config", to_string(o.config)},
          {"ka", o.ka},
          {"ka_fraction", o.ka_fraction},
          {"leftover", std::string(leftover_name(o.leftover))},
          {"method", std::string(method_name(o.method))},
          {"iterations", o.iterations},
          {"cluster_iterations", o.cluster_iterations},
          {"seed", o.seed},
          {"block", o.block},
          {"fit", to_json(o.fit)}};
}

inline nlohmann::json to_json(const cmoe_report& r) {
  nlohmann::json j;
  j["config"] = to_string(r.config);
  j["method"] = r.method;
  j["neurons"] = r.neurons;
  j["per_expert"] = r.per_expert;
  j["shared"] = r.shared;
  j["experts"] = nlohmann::json::array();
  for (std::size_t e = 0; e < r.experts.size(); ++e) {
    nlohmann::json x{{"neurons", r.experts[e]}};
    x["representative"] = e < r.representatives.size() ? nlohmann::json(r.representatives[e]) : nlohmann::json();
    j["experts"].push_back(std::move(x));
  }
  j["leftovers"] = {{"neurons", r.leftovers}, {"fate", r.leftover_fate}};
  j["assignment_cost"] = r.assignment_cost;
  j["pass_costs"] = r.pass_costs;
  j["markers"] = {{"tokens", r.tokens}, {"ka", r.ka}, {"rate_min", r.rate_min}, {"rate_median", r.rate_median},
                  {"rate_p90", r.rate_p90}, {"rate_max", r.rate_max}};
  j["stage_seconds"] = nlohmann::json::object();
  for (const auto& [stage, s] : r.stage_seconds) j["stage_seconds"][stage] = s;
  j["fit"] = to_json(r.fit);
  j["fit"].update(to_json(r.fit_steps));
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
  if (c.shared < 0) throw config_error(moeforge::detail::cat("cmoe config ", name, ": ", c.shared, " shared experts, expected 0 or more"));
  if (c.experts > neurons)
    throw config_error(moeforge::detail::cat("cmoe config ", name, ": ", c.experts, " experts but the FFN has only ", neurons, " neurons"));
  if (c.shared >= c.experts)
    throw config_error(moeforge::detail::cat("cmoe config ", name, ": ", c.shared, " shared of ", c.experts, " experts leaves no routed expert"));
  if (c.active < 1 || c.active > c.experts - c.shared)
    throw config_error(moeforge::detail::cat("cmoe config ", name, ": ", c.active, " active experts, expected 1..", c.experts - c.shared, " (the routed experts)"));
}

/// Throws config_error for options no layer could use (before any work starts).
inline void validate(const cmoe_options& o) {
  if (o.iterations < 1) throw config_error(moeforge::detail::cat("cmoe: iterations = ", o.iterations, ", expected >= 1"));
  if (o.cluster_iterations < 1)
    throw config_error(moeforge::detail::cat("cmoe: cluster_iterations = ", o.cluster_iterations, ", expected >= 1"));
  if (o.block < 1) throw config_error(moeforge::detail::cat("cmoe: block = ", o.block, ", expected >= 1"));
  validate(o.fit);
  if (o.fit.fits() && o.method == cmoe_method::param_cluster)
    throw config_error("cmoe: router fitting, compensation and refit are for the cmoe and random methods, not param_cluster");
}

namespace detail {

using clock = std::chrono::steady_clock;

// Hamming distance between two bit columns of `words` words.
inline std::int64_t hamming(const std::uint64_t* a, const std::uint64_t* b, index_t words) {
  std::int64_t d = 0;
  for (index_t w = 0; w < words; ++w) d += calib::detail::popcount64(a[w] ^ b[w]);
  return d;
}

template <class F>
inline void for_each_bit(const calib::markers& mk, index_t neuron, F&& f) {
  const std::uint64_t* c = mk.column(neuron);
  for (index_t w = 0; w < mk.words; ++w)
    for (std::uint64_t v = c[w]; v; v &= v - 1) f(w * 64 + __builtin_ctzll(v));
}

// Per-token member counts of a cluster (how many members are marked on token t).
inline std::vector<std::int32_t> token_counts(const calib::markers& mk, const std::vector<index_t>& members) {
  std::vector<std::int32_t> cnt(static_cast<std::size_t>(mk.tokens), 0);
  for (index_t i : members) for_each_bit(mk, i, [&](index_t t) { ++cnt[std::size_t(t)]; });
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
    for_each_bit(mk, i, [&](index_t t) { s += m - 2 * cnt[std::size_t(t)]; });
    if (best < 0 || s < best_score || (s == best_score && i < best)) best = i, best_score = s;
  }
  return best;
}

// The outcome of grouping the pool: k groups of exactly m neurons (ascending)
// and the leftovers (ascending) the assignment's zero-cost sink took.
struct grouping {
  std::vector<std::vector<index_t>> groups;
  std::vector<index_t> leftovers;
  std::vector<double> pass_costs;
  std::int64_t first_cost = 0;
};

// One exact balanced assignment of the pool to k clusters of m plus, when the
// pool is larger than k·m, a sink of capacity n − k·m at cost 0. This is the
// reference's LAP on its n × n matrix whose last n − k·m columns are all zero:
// the neurons that would cost most to place are the ones left over.
// `cost` is the n × k matrix (row-major); returns the cluster per item (k = sink).
template <class Cost>
inline assignment_result<Cost> assign_with_sink(index_t n, index_t k, index_t m, const std::vector<Cost>& cost) {
  std::vector<index_t> capacity(std::size_t(k), m);
  if (n > k * m) capacity.push_back(n - k * m);
  return balanced_assignment<Cost>(n, capacity, [&](index_t i, index_t j) {
    return j < k ? cost[std::size_t(i * k + j)] : Cost(0);
  });
}

template <class Cost>
inline void collect(const std::vector<index_t>& pool, index_t k, const assignment_result<Cost>& res, grouping& g) {
  g.groups.assign(std::size_t(k), {});
  g.leftovers.clear();
  for (std::size_t i = 0; i < pool.size(); ++i) {
    const index_t c = res.cluster[i];
    (c < k ? g.groups[std::size_t(c)] : g.leftovers).push_back(pool[i]);
  }
  for (auto& x : g.groups) std::sort(x.begin(), x.end());
  std::sort(g.leftovers.begin(), g.leftovers.end());
}

// CMoE: balanced Hamming clustering of the (rate-ordered) pool. Centroid j is
// kept as per-token counts cnt_j with a weight w_j (a single marker column has
// w = 1; a cluster mean has w = its size), so that
//   w·L1(b_i, cnt_j / w) = Σ_t cnt_jt + Σ_{t: b_it = 1} (w − 2·cnt_jt)
// is an exact integer; every pass scales all costs by the same w.
inline grouping cluster_markers(const calib::markers& mk, const std::vector<index_t>& pool, index_t k, index_t m,
                                index_t iterations) {
  const index_t n = index_t(pool.size());
  std::vector<std::vector<std::int32_t>> cnt(static_cast<std::size_t>(k));
  // Initial centroids: the k highest-rate neurons of the pool.
  for (index_t j = 0; j < k; ++j) cnt[std::size_t(j)] = token_counts(mk, {pool[std::size_t(j)]});
  std::int64_t w = 1;
  grouping g;
  std::vector<index_t> previous;
  for (index_t it = 0; it < iterations; ++it) {
    std::vector<std::int64_t> base(static_cast<std::size_t>(k), 0);
    for (index_t j = 0; j < k; ++j)
      for (std::int32_t c : cnt[std::size_t(j)]) base[std::size_t(j)] += c;
    std::vector<std::int64_t> cost(static_cast<std::size_t>(n * k));
#pragma omp parallel for schedule(dynamic, 16)
    for (index_t i = 0; i < n; ++i) {
      std::int64_t* row = cost.data() + i * k;
      for (index_t j = 0; j < k; ++j) row[j] = base[std::size_t(j)];
      for_each_bit(mk, pool[std::size_t(i)], [&](index_t t) {
        for (index_t j = 0; j < k; ++j) row[j] += w - 2 * std::int64_t(cnt[std::size_t(j)][std::size_t(t)]);
      });
    }
    const auto res = assign_with_sink<std::int64_t>(n, k, m, cost);
    if (it == 0) g.first_cost = res.total;
    g.pass_costs.push_back(double(res.total) / double(w));
    collect(pool, k, res, g);
    if (res.cluster == previous) break;
    previous = res.cluster;
    for (index_t j = 0; j < k; ++j) cnt[std::size_t(j)] = token_counts(mk, g.groups[std::size_t(j)]);
    w = m;
  }
  return g;
}

// splitmix64: a portable generator, so seeded choices are the same everywhere.
inline std::uint64_t splitmix(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A uniform double in [0, 1).
inline double uniform(std::uint64_t& s) { return double(splitmix(s) >> 11) * 0x1.0p-53; }

// Seeded random equal split; the pool's last n − k·m after the shuffle are the leftovers.
inline grouping random_split(std::vector<index_t> pool, index_t k, index_t m, std::uint64_t seed) {
  for (std::size_t i = pool.size(); i > 1; --i) std::swap(pool[i - 1], pool[std::size_t(splitmix(seed) % i)]);
  grouping g;
  g.groups.resize(std::size_t(k));
  for (index_t j = 0; j < k; ++j) {
    g.groups[std::size_t(j)].assign(pool.begin() + j * m, pool.begin() + (j + 1) * m);
    std::sort(g.groups[std::size_t(j)].begin(), g.groups[std::size_t(j)].end());
  }
  g.leftovers.assign(pool.begin() + k * m, pool.end());
  std::sort(g.leftovers.begin(), g.leftovers.end());
  return g;
}

// MoEfication-style balanced k-means on the L2-normalised gate rows of the
// pool: k-means++ start (seeded), then exact balanced assignments (squared L2
// cost, the same zero-cost sink for the leftovers) and mean updates. Returns
// the groups and writes the final centroids [k, H] (means of normalised rows).
inline grouping param_cluster(const ffn& dense, const std::vector<index_t>& pool, index_t k, index_t m, index_t iterations,
                              std::uint64_t seed, matrix& centroids) {
  const index_t n = index_t(pool.size()), h = dense.hidden();
  Eigen::MatrixXd p(n, h);  // column-major: row i is neuron pool[i]'s normalised gate row
  for (index_t i = 0; i < n; ++i) {
    p.row(i) = dense.gate.row(pool[std::size_t(i)]).cast<double>();
    const double nr = p.row(i).norm();
    if (nr > 0) p.row(i) /= nr;
  }
  // Squared distances by explicit loops: the same arithmetic whatever the thread count.
  auto sqdist = [&](const Eigen::MatrixXd& c, std::vector<double>& d) {
    d.assign(std::size_t(n * c.rows()), 0.0);
#pragma omp parallel for schedule(static)
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < c.rows(); ++j) d[std::size_t(i * c.rows() + j)] = (p.row(i) - c.row(j)).squaredNorm();
  };
  // k-means++: the first centre uniformly, each next one with probability ∝ D².
  Eigen::MatrixXd c(k, h);
  std::vector<double> nearest(static_cast<std::size_t>(n), std::numeric_limits<double>::infinity()), d;
  index_t pick = index_t(splitmix(seed) % std::uint64_t(n));
  for (index_t j = 0; j < k; ++j) {
    c.row(j) = p.row(pick);
    double total = 0;
    for (index_t i = 0; i < n; ++i) {
      nearest[std::size_t(i)] = std::min(nearest[std::size_t(i)], (p.row(i) - c.row(j)).squaredNorm());
      total += nearest[std::size_t(i)];
    }
    if (j + 1 == k) break;
    double r = uniform(seed) * total;
    pick = -1;
    for (index_t i = 0; i < n && pick < 0; ++i)
      if (nearest[std::size_t(i)] > 0 && (r -= nearest[std::size_t(i)]) < 0) pick = i;
    if (pick < 0)  // rounding at the end of the sum: the last neuron not yet a centre
      for (index_t i = n - 1; i >= 0 && pick < 0; --i)
        if (nearest[std::size_t(i)] > 0) pick = i;
    if (pick < 0) pick = j + 1;  // every row coincides with a centre: any choice is as good
  }
  grouping g;
  std::vector<index_t> previous;
  // The assignment takes exact integer costs: squared distances (at most 4
  // between unit-length rows and their means) in units of 2^-40.
  constexpr double unit = 0x1p40;
  std::vector<std::int64_t> q;
  for (index_t it = 0; it < iterations; ++it) {
    sqdist(c, d);
    q.resize(d.size());
    std::transform(d.begin(), d.end(), q.begin(), [&](double v) { return std::int64_t(std::llround(v * unit)); });
    const auto res = assign_with_sink<std::int64_t>(n, k, m, q);
    g.pass_costs.push_back(double(res.total) / unit);
    collect(pool, k, res, g);
    // Centroids of this assignment (also after the last pass: they are the router).
    c.setZero();
    for (index_t i = 0; i < n; ++i)
      if (res.cluster[std::size_t(i)] < k) c.row(res.cluster[std::size_t(i)]) += p.row(i);
    c /= double(m);
    if (res.cluster == previous) break;
    previous = res.cluster;
  }
  centroids = c.cast<float>();
  return g;
}

inline double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v[std::size_t(std::llround(q * double(v.size() - 1)))];
}

}  // namespace detail

/// CMoE (or a baseline, see cmoe_method) from precomputed markers of `dense`.
inline cmoe_result cmoe(const ffn& dense, const calib::markers& mk, const cmoe_options& opt) {
  validate(dense, "cmoe: dense ffn");
  if (!dense.gated()) throw config_error("cmoe: the FFN has no gate projection (CMoE needs a gated FFN)");
  const index_t neurons = dense.intermediate();
  validate(opt.config, neurons);
  validate(opt);
  if (mk.neurons != neurons)
    throw shape_error(moeforge::detail::cat("cmoe: markers cover ", mk.neurons, " neurons, the FFN has ", neurons));
  if (mk.tokens == 0) throw config_error("cmoe: zero calibration tokens");
  if (opt.fit.fits())
    throw config_error(moeforge::detail::cat("cmoe: router '", router_fit_name(opt.fit.router), "', compensate '",
                                             compensation_name(opt.fit.compensate), "' and refit '", refit_name(opt.fit.refit),
                                             "' need the calibration inputs, not only their markers (call cmoe with x)"));
  const auto start = detail::clock::now();
  auto seconds = [&] { return std::chrono::duration<double>(detail::clock::now() - start).count(); };
  auto begin_stage = [&](const char* stage) {
    if (opt.progress) opt.progress(cmoe_progress{stage, seconds()});
    return seconds();
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

  // Shared: the Ns·m highest-rate neurons. Pool: all the others, in rate order;
  // the assignment takes k·m of them and leaves I mod N over.
  double t0 = begin_stage("assignment");
  const auto order = calib::neurons_by_rate(mk);
  rep.shared.assign(order.begin(), order.begin() + c.shared * m);
  const std::vector<index_t> pool(order.begin() + c.shared * m, order.end());
  matrix centroids;
  detail::grouping g;
  switch (opt.method) {
    case cmoe_method::cmoe: g = detail::cluster_markers(mk, pool, k, m, opt.iterations); break;
    case cmoe_method::random: g = detail::random_split(pool, k, m, opt.seed); break;
    case cmoe_method::param_cluster:
      g = detail::param_cluster(dense, pool, k, m, opt.cluster_iterations, opt.seed, centroids);
      break;
  }
  rep.experts = std::move(g.groups);
  rep.leftovers = std::move(g.leftovers);
  rep.assignment_cost = g.first_cost;
  rep.pass_costs = std::move(g.pass_costs);
  rep.leftover_fate = rep.leftovers.empty() ? "none" : opt.leftover == leftover_policy::drop ? "dropped" : "shared";
  if (opt.leftover == leftover_policy::shared) rep.shared.insert(rep.shared.end(), rep.leftovers.begin(), rep.leftovers.end());
  std::sort(rep.shared.begin(), rep.shared.end());
  rep.stage_seconds.emplace_back("assignment", seconds() - t0);

  t0 = begin_stage("router");
  moe_layer& layer = out.layer;
  layer.router.top_k = c.active;
  layer.router.scale = 1.0f;
  if (opt.method == cmoe_method::param_cluster) {
    layer.router.kind = router_kind::centroid_topk;
    layer.router.weight = std::move(centroids);
  } else {
    layer.router.kind = router_kind::cmoe_analytic;
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
  }
  rep.stage_seconds.emplace_back("router", seconds() - t0);

  t0 = begin_stage("experts");
  layer.experts.resize(std::size_t(k));
  if (!rep.shared.empty()) layer.shared.resize(1);
  // The shared expert, the largest, is built first (job 0) when there is one.
  const auto first = index_t(layer.shared.size());
  const index_t jobs = first + k;
  std::vector<std::exception_ptr> failed(static_cast<std::size_t>(jobs));  // (bad_alloc) must not escape the parallel region
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t q = 0; q < jobs; ++q) try {
      if (q < first)
        layer.shared[0].weights = select_neurons(dense, rep.shared);
      else
        layer.experts[std::size_t(q - first)].weights = select_neurons(dense, rep.experts[std::size_t(q - first)]);
    } catch (...) {
      failed[std::size_t(q)] = std::current_exception();
    }
  for (const auto& e : failed)
    if (e) std::rethrow_exception(e);
  rep.stage_seconds.emplace_back("experts", seconds() - t0);

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
/// post-attention RMSNorm), then the fitting steps opt.fit asks for.
/// Neurons inside each expert are in ascending index order.
inline cmoe_result cmoe(const ffn& dense, const_matrix_ref x, const cmoe_options& opt) {
  validate(dense, "cmoe: dense ffn");
  if (!dense.gated()) throw config_error("cmoe: the FFN has no gate projection (CMoE needs a gated FFN)");
  validate(opt.config, dense.intermediate());
  validate(opt);
  if (x.rows() == 0) throw config_error("cmoe: zero calibration tokens");
  const index_t ka = resolve_ka(opt, dense.intermediate());
  const auto start = detail::clock::now();
  if (opt.progress) opt.progress(cmoe_progress{"markers", 0.0});
  const calib::markers mk = calib::compute_markers(dense, x, ka, opt.block);
  const double t_markers = std::chrono::duration<double>(detail::clock::now() - start).count();
  cmoe_options rest = opt;
  rest.fit = fit_options{};
  if (opt.progress) rest.progress = [&](const cmoe_progress& p) { opt.progress(cmoe_progress{p.stage, t_markers + p.seconds}); };
  cmoe_result out = cmoe(dense, mk, rest);
  out.report.stage_seconds.insert(out.report.stage_seconds.begin(), {"markers", t_markers});
  out.report.fit = opt.fit;
  if (opt.fit.fits()) {
    const auto t0 = detail::clock::now();
    if (opt.progress) opt.progress(cmoe_progress{"fit", std::chrono::duration<double>(t0 - start).count()});
    out.report.fit_steps = fit_layer(dense, out.layer, x, opt.fit);
    out.report.stage_seconds.emplace_back("fit", std::chrono::duration<double>(detail::clock::now() - t0).count());
  }
  return out;
}

/// CMoE on one visited dense layer, replacing it: the per-layer method that
/// cmoe_model and the streamed conversion (stream.hpp) share.
inline cmoe_report cmoe_layer(layer_visit& v, const cmoe_options& opt) {
  cmoe_options layer_opt = opt;
  layer_opt.progress = [&](const cmoe_progress& p) { v.stage(p.stage); };
  cmoe_result res = cmoe(std::get<ffn>(v.ffn), v.inputs, layer_opt);
  v.ffn = std::move(res.layer);
  return std::move(res.report);
}

/// Progress of a whole model's CMoE conversion: stages "calibration",
/// "markers", "assignment", "router", "experts", "fit" (when fitting), then "done" per layer.
using cmoe_model_progress = layer_progress;

/// Converts every dense layer of `w` in place, in layer order, each calibrated
/// on the model as converted so far; returns one report per layer (empty for
/// layers that are already MoE). Every layer's configuration is checked
/// before any layer is touched.
inline std::vector<cmoe_report> cmoe_model(model::weights& w, const ffn_inputs_fn& inputs, const cmoe_options& opt,
                                           const progress_fn& progress = {}) {
  validate(opt);
  for (std::size_t l = 0; l < w.layers.size(); ++l)
    if (const ffn* f = std::get_if<ffn>(&w.layers[l].ffn)) {
      if (!f->gated())
        throw config_error(moeforge::detail::cat("cmoe: layer ", l, "'s FFN has no gate projection (CMoE needs a gated FFN)"));
      validate(opt.config, f->intermediate());
      resolve_ka(opt, f->intermediate());
      if (opt.fit.router == router_fit::quadratic && opt.fit.rank > f->hidden())
        throw config_error(moeforge::detail::cat("cmoe: rank = ", opt.fit.rank, ", expected 1..", f->hidden(), " (the hidden size)"));
    }
  std::vector<cmoe_report> reports(w.layers.size());
  visit_options vo;
  vo.filter = layer_filter::dense;
  vo.progress = progress;
  visit_layers(w, inputs, vo, [&](layer_visit& v, double calibration_seconds) {
    cmoe_report r = cmoe_layer(v, opt);
    r.stage_seconds.insert(r.stage_seconds.begin(), {"calibration", calibration_seconds});
    reports[std::size_t(v.layer)] = std::move(r);
  });
  return reports;
}

}  // namespace moeforge::convert
