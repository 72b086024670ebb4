// MoNE (Zhang et al. 2025, "Replacing Redundant Experts with Lightweight
// Novices"; ALGORITHMS.md §2): prune the redundant routed experts of MoE
// layers and put a novice — the expert's mean output, a constant vector — in
// each pruned slot. With it, the baselines a comparison of pruning methods
// needs: zero novice, frequency pruning (expert and router row removed),
// REAP, random, and an output-error search; per layer or ranked across the
// model. Every method frees the pruned experts' weights and reports by how much.
//
// Decisions this header makes where the papers are silent:
// - Candidates are the layer's real experts. A slot that is already a novice
//   (a model pruned before) is never pruned again, and ratios count real
//   experts only: r = round(ratio · real experts).
// - An expert never routed on the calibration tokens has freq 0, var 0 and
//   REAP 0, so every scored method (mone, zero, frequency, reap) prunes it
//   first; its error in the search is 0 on the calibration tokens, so the
//   search prefers it too. Its novice is the zero vector (it has no mean).
//   Ties of equal scores go to the lower expert index (global scope: the
//   lower layer, then expert).
// - Statistics use the router's top-k without its DualSparse drop policy:
//   what each expert is asked to compute, whichever pairs dropping skips.
// - Frequency pruning (and any method with replacement `remove`) deletes the
//   slot and its rows of every per-expert router tensor (a fitted router's
//   bias and quadratic weights too) and of the novice compensation, whose
//   bias then leaves out the deleted experts' means (bias = Σ means stays
//   true): the layer computes as if they had never been there. The softmax
//   then covers the experts left. If fewer slots remain than the router's
//   top_k, top_k is clamped to them and the report says so (top_k
//   before/after): refusing would make high ratios impossible for the one
//   method that changes the routing.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/calib/expert_stats.hpp"
#include "moeforge/convert/cmoe.hpp"
#include "moeforge/convert/driver.hpp"
#include "moeforge/core/moe.hpp"
#include "moeforge/model/weights.hpp"

namespace moeforge::convert {

/// How the experts to prune are chosen (and, by default, what replaces them).
enum class mone_method {
  mone,       ///< lowest var·freq; novice = the expert's mean output
  zero,       ///< MoNE's choice with a zero novice (the ablation)
  frequency,  ///< lowest freq; the expert and its router row are removed
  reap,       ///< lowest REAP score, mean over routed tokens of g·‖output‖₂; removed
  random,     ///< a seeded random choice; novice = the mean output
  search,     ///< the set whose novices give the least output error on calibration tokens
};

/// Where the r experts to prune are counted.
enum class mone_scope {
  layer,   ///< exactly round(ratio · E) (or count) in every layer
  global,  ///< one ranking across all layers; each layer keeps at least one real expert
};

/// freq_i = Σ_t g_i(t)·[i ∈ topk(t)] divided by ...
enum class freq_form {
  all,     ///< ... all calibration tokens (the reference code's form)
  routed,  ///< ... the tokens routed to i (the paper's text; constant 1 for gate-1 routers such as CMoE's)
};

/// What a pruned slot becomes.
enum class prune_replacement {
  novice,  ///< constant mean output μ_i, times the slot's gate weight; router unchanged
  zero,    ///< constant zero: routed tokens get nothing from the slot; router unchanged
  remove,  ///< no slot: the expert, its router rows and its compensation mean are deleted
};

inline constexpr mone_method all_mone_methods[] = {mone_method::mone, mone_method::zero, mone_method::frequency,
                                                   mone_method::reap, mone_method::random, mone_method::search};
inline constexpr mone_scope all_mone_scopes[] = {mone_scope::layer, mone_scope::global};
inline constexpr freq_form all_freq_forms[] = {freq_form::all, freq_form::routed};
inline constexpr prune_replacement all_prune_replacements[] = {prune_replacement::novice, prune_replacement::zero,
                                                               prune_replacement::remove};

inline std::string_view mone_method_name(mone_method m) {
  switch (m) {
    case mone_method::mone: return "mone";
    case mone_method::zero: return "zero";
    case mone_method::frequency: return "frequency";
    case mone_method::reap: return "reap";
    case mone_method::random: return "random";
    case mone_method::search: return "search";
  }
  return "?";
}
inline std::string_view mone_scope_name(mone_scope s) { return s == mone_scope::layer ? "layer" : "global"; }
inline std::string_view freq_form_name(freq_form f) { return f == freq_form::all ? "all" : "routed"; }
inline std::string_view replacement_name(prune_replacement r) {
  switch (r) {
    case prune_replacement::novice: return "novice";
    case prune_replacement::zero: return "zero";
    case prune_replacement::remove: return "remove";
  }
  return "?";
}

namespace detail {

// One parser for every option of this header: the text must be one of the names.
template <class E, std::size_t N>
E parse_choice(std::string_view text, const E (&all)[N], std::string_view (*name)(E), const char* option) {
  std::string expected;
  for (std::size_t i = 0; i < N; ++i) {
    if (text == name(all[i])) return all[i];
    expected += std::string(i == 0 ? "" : i + 1 == N ? " or " : ", ") + std::string(name(all[i]));
  }
  throw config_error(moeforge::detail::cat(option, " '", text, "': expected ", expected));
}

}  // namespace detail

/// Parsers: throw config_error naming the option and the accepted names.
inline mone_method parse_mone_method(std::string_view t) { return detail::parse_choice(t, all_mone_methods, mone_method_name, "mone method"); }
inline mone_scope parse_mone_scope(std::string_view t) { return detail::parse_choice(t, all_mone_scopes, mone_scope_name, "mone scope"); }
inline freq_form parse_freq_form(std::string_view t) { return detail::parse_choice(t, all_freq_forms, freq_form_name, "mone freq form"); }
inline prune_replacement parse_replacement(std::string_view t) {
  return detail::parse_choice(t, all_prune_replacements, replacement_name, "mone replacement");
}

/// Each method's replacement as its paper uses it. REAP removes experts (as
/// the REAP paper does); random keeps MoNE's novices, so that it is the
/// control for MoNE's choice of experts. `mone_options::replacement`
/// overrides it to compare choices under one replacement.
inline prune_replacement default_replacement(mone_method m) {
  switch (m) {
    case mone_method::zero: return prune_replacement::zero;
    case mone_method::frequency:
    case mone_method::reap: return prune_replacement::remove;
    default: return prune_replacement::novice;
  }
}

struct mone_options {
  mone_method method = mone_method::mone;
  /// Share of the real experts to prune, in [0, 1): round(ratio · E) per layer
  /// (layer scope) or round(ratio · Σ E) in all (global scope).
  double ratio = 0.0;
  /// Instead of ratio: experts to prune per layer (layer scope) or in the
  /// whole model (global scope).
  std::optional<index_t> count;
  mone_scope scope = mone_scope::layer;
  freq_form freq = freq_form::all;
  /// Unset: the method's own (default_replacement).
  std::optional<prune_replacement> replacement;
  /// random: the choice; each layer draws from its own stream derived from the seed.
  std::uint64_t seed = 0;
  /// Layer scope: true, layer l's statistics come from the model pruned up to
  /// l−1 (CMoE's protocol); false, from the unpruned model. Global scope
  /// always uses the unpruned model: its ranking needs every layer's
  /// statistics before any layer may be pruned.
  bool sequential = true;
  /// search: exhaustive when C(E, r) is at most this many subsets, else greedy.
  double exhaustive_limit = 1e4;
};

inline prune_replacement replacement_of(const mone_options& o) { return o.replacement.value_or(default_replacement(o.method)); }

/// Throws config_error, naming the option, for options no model could use.
inline void validate(const mone_options& o) {
  using moeforge::detail::cat;
  if (o.count) {
    if (*o.count < 0) throw config_error(cat("mone: count = ", *o.count, ", expected >= 0"));
    if (o.ratio != 0.0) throw config_error(cat("mone: ratio = ", o.ratio, " and count = ", *o.count, " given; give one of them"));
  } else if (!(o.ratio >= 0.0 && o.ratio < 1.0)) {
    throw config_error(cat("mone: ratio = ", o.ratio, ", expected a value in [0, 1)"));
  }
  if (!(o.exhaustive_limit >= 0.0)) throw config_error(cat("mone: exhaustive_limit = ", o.exhaustive_limit, ", expected >= 0"));
  if (o.method == mone_method::search && replacement_of(o) == prune_replacement::remove)
    throw config_error("mone: method search with replacement remove: the search scores replacements that keep the routing, "
                       "and removing a router row changes it (use novice or zero)");
  if (o.method == mone_method::search && o.scope == mone_scope::global)
    throw config_error("mone: method search with scope global: output errors of different layers are not comparable; "
                       "the search runs per layer (use scope layer)");
}

/// Bytes per stored weight in the native format (F32), what bytes_freed counts.
inline constexpr std::int64_t native_weight_bytes = 4;

/// Routing mass of one expert in the chosen form; 0 for an expert never routed.
inline double expert_freq(const calib::expert_stats& s, index_t tokens, freq_form f) {
  if (s.routed == 0) return 0.0;
  return s.mass / double(f == freq_form::all ? tokens : s.routed);
}

/// REAP: mean over the routed tokens of g·‖unweighted output‖₂; 0 for an expert never routed.
inline double reap_score(const calib::expert_stats& s) { return s.routed > 0 ? s.reap / double(s.routed) : 0.0; }

/// One pruned expert as the report lists it.
struct pruned_expert {
  index_t expert = 0;           ///< slot index in the input layer
  std::optional<double> score;  ///< the method's ranking score (none for random)
  double freq = 0;              ///< in the options' form
  double var = 0;               ///< sqrt of the summed per-dimension output variance
  double reap = 0;              ///< REAP score
  index_t routed = 0;           ///< calibration tokens routed to it
};

struct mone_layer_report {
  index_t layer = -1;  ///< in the model (-1 for a single layer)
  index_t experts = 0;  ///< slots in the input layer
  index_t real = 0;     ///< of them, real experts (the candidates)
  index_t tokens = 0;   ///< calibration tokens
  std::string replacement;
  std::vector<pruned_expert> pruned;           ///< in the order the method chose them
  std::vector<std::optional<double>> scores;   ///< per input slot (none: a novice slot, or method random)
  std::vector<index_t> kept;                   ///< replacement remove: the input slot of each output slot
  std::string search;                          ///< method search: "exhaustive" or "greedy"
  double subsets = 0;                          ///< method search: subsets (exhaustive) or candidate sets (greedy) evaluated
  /// Method search: Σ_t ‖Δy_t‖² over the calibration tokens for the chosen set.
  std::optional<double> calibration_error;
  index_t top_k_before = 0, top_k_after = 0;
  index_t params_freed = 0;
  std::int64_t bytes_freed = 0;
};

struct mone_layer_result {
  moe_layer layer;
  mone_layer_report report;
};

struct mone_report {
  std::string method, replacement, scope, freq;
  std::optional<double> ratio;
  std::optional<index_t> count;
  std::uint64_t seed = 0;
  std::string inputs;  ///< "sequential" (model pruned up to l−1) or "unpruned"
  index_t tokens = 0;
  std::vector<mone_layer_report> layers;  ///< one per MoE layer, in layer order
  index_t experts_pruned = 0;
  index_t params_freed = 0;
  std::int64_t bytes_freed = 0;
};

namespace detail {

inline nlohmann::json or_null(const std::optional<double>& v) { return v ? nlohmann::json(*v) : nlohmann::json(); }

inline std::vector<index_t> real_experts(const moe_layer& m) {
  std::vector<index_t> out;
  for (index_t e = 0; e < m.num_experts(); ++e)
    if (!m.experts[std::size_t(e)].is_novice()) out.push_back(e);
  return out;
}

inline void check_stats(const moe_layer& m, const calib::layer_stats& st) {
  if (index_t(st.experts.size()) != m.num_experts())
    throw shape_error(moeforge::detail::cat("mone: statistics of ", st.experts.size(), " experts for a layer of ", m.num_experts()));
  for (const auto& s : st.experts)
    if (s.output.mean.size() != m.hidden())
      throw shape_error(moeforge::detail::cat("mone: statistics of ", s.output.mean.size(), " output features for a layer of ", m.hidden()));
}

// splitmix64 (cmoe.hpp) drives every seeded choice, so it is the same on every platform.
inline void shuffle(std::vector<index_t>& v, std::uint64_t& state) {
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[std::size_t(splitmix(state) % i)]);
}

inline std::uint64_t layer_seed(std::uint64_t seed, index_t layer) {
  std::uint64_t s = seed ^ (0xd1b54a32d192ed03ull * std::uint64_t(layer + 1));
  return splitmix(s);
}

// Pruning `set` (replacement novice or zero, router unchanged) changes token
// t's output by Δy_t = −Σ_{i ∈ set routed at t} g_i(t)·(O_i(t) − c_i), c = μ or
// 0. So Σ_t ‖Δy_t‖² = Σ_{i,j ∈ set} G_ij with
//   G_ij = Σ_{t routed to both} g_i(t) g_j(t) (O_i(t) − c_i)·(O_j(t) − c_j),
// and one pass over the kept outputs prices every subset. Over `candidates` (slots).
inline Eigen::MatrixXd error_gram(const calib::layer_stats& st, const std::vector<index_t>& candidates, prune_replacement r) {
  using moeforge::detail::cat;
  const index_t n = index_t(candidates.size());
  std::vector<std::vector<std::pair<index_t, index_t>>> at(static_cast<std::size_t>(st.tokens));  // (candidate, output row) per token
  index_t most = 0;  // candidates routed at one token
  for (index_t c = 0; c < n; ++c) {
    const auto& s = st.experts[std::size_t(candidates[std::size_t(c)])];
    if (s.outputs.rows() != s.routed || index_t(s.tokens.size()) != s.routed)
      throw config_error(cat("mone: the search needs every routed output (expert statistics with keep_outputs); expert ",
                             candidates[std::size_t(c)], " has ", s.outputs.rows(), " of ", s.routed));
    for (index_t p = 0; p < s.routed; ++p) {
      auto& here = at[std::size_t(s.tokens[std::size_t(p)])];
      here.push_back({c, p});
      most = std::max(most, index_t(here.size()));
    }
  }
  // Token by token, so the residuals need no copy of the kept outputs.
  Eigen::MatrixXd g = Eigen::MatrixXd::Zero(n, n), d(most, st.experts.empty() ? 0 : st.experts.front().output.mean.size());
  for (const auto& pairs : at) {
    for (std::size_t i = 0; i < pairs.size(); ++i) {
      const auto& s = st.experts[std::size_t(candidates[std::size_t(pairs[i].first)])];
      d.row(index_t(i)) = s.outputs.row(pairs[i].second).cast<double>();
      if (r == prune_replacement::novice) d.row(index_t(i)) -= s.output.mean.transpose();
      d.row(index_t(i)) *= double(s.gate[std::size_t(pairs[i].second)]);
    }
    for (std::size_t i = 0; i < pairs.size(); ++i)
      for (std::size_t j = 0; j < pairs.size(); ++j) g(pairs[i].first, pairs[j].first) += d.row(index_t(i)).dot(d.row(index_t(j)));
  }
  return g;
}

inline double subset_error(const Eigen::MatrixXd& g, const std::vector<index_t>& set) {
  double e = 0;
  for (index_t i : set)
    for (index_t j : set) e += g(i, j);
  return e;
}

inline double binomial(index_t n, index_t k) {
  double c = 1;
  for (index_t i = 1; i <= k; ++i) c = c * double(n - k + i) / double(i);
  return c;
}

struct search_result {
  std::vector<index_t> chosen;  ///< positions in the Gram matrix
  std::string kind;
  double subsets = 0;
  double error = 0;
};

// The r-subset with the least Σ G: every subset in lexicographic order (the
// first of equal minima wins) when there are at most `limit`, else greedily,
// adding each time the candidate that raises the error least.
inline search_result min_error_subset(const Eigen::MatrixXd& g, index_t r, double limit) {
  const index_t n = g.rows();
  search_result out;
  if (r == 0) {
    out.kind = "exhaustive";
    out.subsets = 1;
    return out;
  }
  if (binomial(n, r) <= limit) {
    out.kind = "exhaustive";
    std::vector<index_t> idx(static_cast<std::size_t>(r));
    std::iota(idx.begin(), idx.end(), 0);
    double best = std::numeric_limits<double>::infinity();
    for (;;) {
      ++out.subsets;
      const double e = subset_error(g, idx);
      if (e < best) best = e, out.chosen = idx;
      index_t i = r - 1;  // the next combination
      while (i >= 0 && idx[std::size_t(i)] == n - r + i) --i;
      if (i < 0) break;
      ++idx[std::size_t(i)];
      for (index_t j = i + 1; j < r; ++j) idx[std::size_t(j)] = idx[std::size_t(j - 1)] + 1;
    }
    out.error = best;
    return out;
  }
  out.kind = "greedy";
  std::vector<char> taken(static_cast<std::size_t>(n), 0);
  for (index_t step = 0; step < r; ++step) {
    index_t pick = -1;
    double best = std::numeric_limits<double>::infinity();
    for (index_t c = 0; c < n; ++c) {
      if (taken[std::size_t(c)]) continue;
      ++out.subsets;
      double inc = g(c, c);
      for (index_t s : out.chosen) inc += 2.0 * g(c, s);
      if (inc < best) best = inc, pick = c;
    }
    taken[std::size_t(pick)] = 1;
    out.chosen.push_back(pick);
  }
  out.error = subset_error(g, out.chosen);
  return out;
}

/// What to prune in one layer and why.
struct prune_plan {
  std::vector<index_t> chosen;                // slots, in the order chosen
  std::vector<std::optional<double>> scores;  // per slot
  std::string search;
  double subsets = 0;
  std::optional<double> error;
};

// The ranking score of every real expert for the scored methods (lower = pruned first).
inline std::vector<std::optional<double>> ranking_scores(const moe_layer& m, const calib::layer_stats& st, const mone_options& o) {
  std::vector<std::optional<double>> out(m.experts.size());
  for (const index_t e : real_experts(m)) {
    const auto& s = st.experts[std::size_t(e)];
    const double freq = expert_freq(s, st.tokens, o.freq);
    switch (o.method) {
      case mone_method::mone:
      case mone_method::zero: out[std::size_t(e)] = s.output_spread() * freq; break;
      case mone_method::frequency: out[std::size_t(e)] = freq; break;
      case mone_method::reap: out[std::size_t(e)] = reap_score(s); break;
      case mone_method::random:
      case mone_method::search: break;
    }
  }
  return out;
}

// Real experts in pruning order: ascending score, ties to the lower index.
inline std::vector<index_t> by_score(const std::vector<index_t>& candidates, const std::vector<std::optional<double>>& scores) {
  std::vector<index_t> order = candidates;
  std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return *scores[std::size_t(a)] < *scores[std::size_t(b)]; });
  return order;
}

// Chooses r real experts of one layer by the method (layer scope).
inline prune_plan plan_layer(const moe_layer& m, const calib::layer_stats& st, const mone_options& o, index_t r, std::uint64_t seed) {
  prune_plan p;
  const auto candidates = real_experts(m);
  if (o.method == mone_method::search) {
    const Eigen::MatrixXd g = error_gram(st, candidates, replacement_of(o));
    p.scores.resize(m.experts.size());
    for (std::size_t c = 0; c < candidates.size(); ++c) p.scores[std::size_t(candidates[c])] = g(index_t(c), index_t(c));
    const auto s = min_error_subset(g, r, o.exhaustive_limit);
    for (index_t c : s.chosen) p.chosen.push_back(candidates[std::size_t(c)]);
    p.search = s.kind;
    p.subsets = s.subsets;
    p.error = s.error;
    return p;
  }
  p.scores = ranking_scores(m, st, o);
  std::vector<index_t> order = candidates;
  if (o.method == mone_method::random)
    detail::shuffle(order, seed);
  else
    order = by_score(candidates, p.scores);
  p.chosen.assign(order.begin(), order.begin() + std::ptrdiff_t(r));
  return p;
}

/// The rows `kept` of t, a matrix or vector (an empty one stays empty: a
/// tensor the router kind does not use).
template <class Tensor>
Tensor kept_rows(const Tensor& t, const std::vector<index_t>& kept) {
  if (t.size() == 0) return t;
  Tensor out(index_t(kept.size()), t.cols());
  for (std::size_t j = 0; j < kept.size(); ++j) out.row(index_t(j)) = t.row(kept[j]);
  return out;
}

/// Replaces or removes the planned experts of `m` and writes the report.
/// Removing, the experts move into the new layer only to be validated, and
/// back if it is refused: m (the model's layer) is never left emptied.
inline mone_layer_result apply_plan(moe_layer&& m, const calib::layer_stats& st, const prune_plan& p, const mone_options& o) {
  using moeforge::detail::cat;
  const prune_replacement rep = replacement_of(o);
  std::vector<char> pruned(m.experts.size(), 0);
  for (index_t e : p.chosen) {
    if (e < 0 || e >= m.num_experts()) throw config_error(cat("mone: expert ", e, " to prune, the layer has ", m.num_experts()));
    if (m.experts[std::size_t(e)].is_novice()) throw config_error(cat("mone: expert ", e, " is already a novice (not pruned again)"));
    if (pruned[std::size_t(e)]) throw config_error(cat("mone: expert ", e, " listed twice"));
    pruned[std::size_t(e)] = 1;
  }
  const auto real = real_experts(m);
  if (!p.chosen.empty() && p.chosen.size() >= real.size())
    throw config_error(cat("mone: pruning ", p.chosen.size(), " experts would leave no real expert of ", real.size()));

  mone_layer_result out;
  mone_layer_report& r = out.report;
  r.experts = m.num_experts();
  r.real = index_t(real.size());
  r.tokens = st.tokens;
  r.replacement = std::string(replacement_name(rep));
  r.scores = p.scores;
  r.search = p.search;
  r.subsets = p.subsets;
  r.calibration_error = p.error;
  r.top_k_before = r.top_k_after = m.router.top_k;
  for (index_t e : p.chosen) {
    const auto& s = st.experts[std::size_t(e)];
    r.pruned.push_back({e, p.scores.empty() ? std::nullopt : p.scores[std::size_t(e)], expert_freq(s, st.tokens, o.freq),
                        s.output_spread(), reap_score(s), s.routed});
  }
  if (p.chosen.empty()) {  // nothing to prune: the layer is returned as it came
    out.layer = std::move(m);
    return out;
  }
  const index_t before = moeforge::parameter_count(m);
  const index_t h = m.hidden();
  if (rep == prune_replacement::remove) {
    for (index_t e = 0; e < m.num_experts(); ++e)
      if (!pruned[std::size_t(e)]) r.kept.push_back(e);
    const index_t n = index_t(r.kept.size());
    moe_layer k;
    k.router = m.router;
    for (matrix* t : {&k.router.weight, &k.router.weight_up, &k.router.weight_quad}) *t = kept_rows(*t, r.kept);
    k.router.bias = kept_rows(k.router.bias, r.kept);
    k.router.drop.expert_factor.clear();
    if (!m.router.drop.expert_factor.empty())
      for (const index_t e : r.kept) k.router.drop.expert_factor.push_back(m.router.drop.factor(e));
    k.router.top_k = std::min(k.router.top_k, n);
    if (m.compensation.active()) {
      k.compensation.means = kept_rows(m.compensation.means, r.kept);
      k.compensation.bias = m.compensation.bias;
      for (const index_t e : p.chosen) k.compensation.bias -= m.compensation.means.row(e).transpose();
    }
    // The experts move last, and back if the layer is refused.
    k.shared = std::move(m.shared);
    for (const index_t e : r.kept) k.experts.push_back(std::move(m.experts[std::size_t(e)]));
    try {
      validate(k, "mone: pruned layer");
    } catch (...) {
      m.shared = std::move(k.shared);
      for (std::size_t j = 0; j < r.kept.size(); ++j) m.experts[std::size_t(r.kept[j])] = std::move(k.experts[j]);
      throw;
    }
    r.top_k_after = k.router.top_k;
    m = std::move(k);
  } else {
    for (index_t e : p.chosen) {
      auto& x = m.experts[std::size_t(e)];
      x.weights = ffn{};  // frees the expert's weights
      x.parts.clear();
      x.major = 0;
      // An expert never routed has no mean: its running mean stayed 0.
      x.novice = rep == prune_replacement::novice ? vector(st.experts[std::size_t(e)].output.mean.cast<float>()) : vector(vector::Zero(h));
    }
    validate(m, "mone: pruned layer");
  }
  r.params_freed = before - moeforge::parameter_count(m);
  r.bytes_freed = std::int64_t(r.params_freed) * native_weight_bytes;
  out.layer = std::move(m);
  return out;
}

}  // namespace detail

/// Experts to prune in a layer of `real` real experts (layer scope). Throws
/// config_error naming the option when that would prune all of them.
inline index_t layer_prune_count(index_t real, const mone_options& o, const std::string& where) {
  using moeforge::detail::cat;
  const index_t r = o.count ? *o.count : index_t(std::llround(o.ratio * double(real)));
  if (r > 0 && r >= real)
    throw config_error(cat("mone: ", o.count ? cat("count = ", r) : cat("ratio = ", o.ratio, " (", r, " experts)"),
                           " would prune every real expert of ", where, ", which has ", real, " (at least one must stay)"));
  return r;
}

/// The ranking score of every slot for `o.method` (lower = pruned first):
/// mone/zero var·freq, frequency freq, reap the REAP score, search the
/// output error of replacing that expert alone (needs statistics with
/// keep_outputs). None for novice slots and for method random. Throws
/// config_error for the options mone refuses (search with replacement remove).
inline std::vector<std::optional<double>> expert_scores(const moe_layer& m, const calib::layer_stats& st, const mone_options& o) {
  validate(o);
  detail::check_stats(m, st);
  if (o.method != mone_method::search) return detail::ranking_scores(m, st, o);
  const auto candidates = detail::real_experts(m);
  const Eigen::MatrixXd g = detail::error_gram(st, candidates, replacement_of(o));
  std::vector<std::optional<double>> out(m.experts.size());
  for (std::size_t c = 0; c < candidates.size(); ++c) out[std::size_t(candidates[c])] = g(index_t(c), index_t(c));
  return out;
}

/// Prunes the given real experts of `m` (slot indices) with the options'
/// replacement: the layer-level primitive for a choice made elsewhere.
inline mone_layer_result prune_experts(moe_layer m, const calib::layer_stats& st, const std::vector<index_t>& experts,
                                       const mone_options& o) {
  validate(o);
  detail::check_stats(m, st);
  detail::prune_plan p;
  p.chosen = experts;
  p.scores = o.method == mone_method::search ? std::vector<std::optional<double>>(m.experts.size()) : detail::ranking_scores(m, st, o);
  return detail::apply_plan(std::move(m), st, p, o);
}

/// MoNE (or a baseline) on one layer with its calibration statistics
/// (calib::expert_statistics; method search needs keep_outputs): chooses
/// round(ratio · E) real experts (or count) within the layer and prunes them.
/// `seed` drives method random. Throws config_error for unusable options.
inline mone_layer_result mone(moe_layer m, const calib::layer_stats& st, const mone_options& o) {
  validate(o);
  detail::check_stats(m, st);
  const index_t r = layer_prune_count(index_t(detail::real_experts(m).size()), o, "the layer");
  const detail::prune_plan p = detail::plan_layer(m, st, o, r, o.seed);
  return detail::apply_plan(std::move(m), st, p, o);
}

inline nlohmann::json to_json(const mone_layer_report& r) {
  nlohmann::json pruned = nlohmann::json::array(), scores = nlohmann::json::array();
  for (const auto& p : r.pruned)
    pruned.push_back({{"expert", p.expert}, {"score", detail::or_null(p.score)}, {"freq", p.freq}, {"var", p.var}, {"reap", p.reap},
                      {"routed", p.routed}});
  for (const auto& s : r.scores) scores.push_back(detail::or_null(s));
  nlohmann::json j{{"layer", r.layer},   {"experts", r.experts}, {"real", r.real},       {"tokens", r.tokens},
                   {"replacement", r.replacement}, {"pruned", pruned}, {"scores", scores},
                   {"top_k", {{"before", r.top_k_before}, {"after", r.top_k_after}}},
                   {"params_freed", r.params_freed}, {"bytes_freed", r.bytes_freed}};
  if (!r.kept.empty()) j["kept"] = r.kept;
  if (!r.search.empty()) j["search"] = {{"kind", r.search}, {"subsets", r.subsets}, {"calibration_error", detail::or_null(r.calibration_error)}};
  return j;
}

/// The options as JSON (what a streamed conversion's resume must match).
inline nlohmann::json to_json(const mone_options& o) {
  return {{"method", std::string(mone_method_name(o.method))},
          {"ratio", o.ratio},
          {"count", o.count ? nlohmann::json(*o.count) : nlohmann::json()},
          {"scope", std::string(mone_scope_name(o.scope))},
          {"freq", std::string(freq_form_name(o.freq))},
          {"replacement", std::string(replacement_name(replacement_of(o)))},
          {"seed", o.seed},
          {"sequential", o.sequential},
          {"exhaustive_limit", o.exhaustive_limit}};
}

inline nlohmann::json to_json(const mone_report& r) {
  nlohmann::json layers = nlohmann::json::array();
  for (const auto& l : r.layers) layers.push_back(to_json(l));
  return {{"method", r.method},
          {"replacement", r.replacement},
          {"scope", r.scope},
          {"freq", r.freq},
          {"ratio", detail::or_null(r.ratio)},
          {"count", r.count ? nlohmann::json(*r.count) : nlohmann::json()},
          {"seed", r.seed},
          {"inputs", r.inputs},
          {"tokens", r.tokens},
          {"experts_pruned", r.experts_pruned},
          {"params_freed", r.params_freed},
          {"bytes_freed", r.bytes_freed},
          {"layers", std::move(layers)}};
}

namespace detail {

/// One visited layer's statistics (what the pruning still needs of them) and,
/// at layer scope, its choice.
struct planned_layer {
  index_t layer = 0;
  calib::layer_stats stats;
  prune_plan plan;
};

inline planned_layer plan_visit(const layer_visit& v, const mone_options& o) {
  const auto& m = std::get<moe_layer>(v.ffn);
  v.stage("statistics");
  calib::expert_stats_options so;
  so.keep_outputs = o.method == mone_method::search;
  planned_layer p{v.layer, calib::expert_statistics(m, v.inputs, so), {}};
  if (o.scope == mone_scope::layer) {
    v.stage(o.method == mone_method::search ? "search" : "ranking");
    const index_t r = layer_prune_count(index_t(real_experts(m).size()), o, moeforge::detail::cat("layer ", v.layer));
    p.plan = plan_layer(m, p.stats, o, r, layer_seed(o.seed, v.layer));
  }
  // What the pruning still needs of the statistics: the means and the figures.
  p.stats.selection = {};
  for (auto& s : p.stats.experts) {
    s.importance = Eigen::VectorXd();
    s.tokens = {};
    s.gate = {};
    s.outputs = matrix();
  }
  return p;
}

inline mone_layer_report apply_planned(model::layer_ffn& f, const planned_layer& p, const mone_options& o) {
  mone_layer_result res = apply_plan(std::move(std::get<moe_layer>(f)), p.stats, p.plan, o);
  res.report.layer = p.layer;
  f = std::move(res.layer);
  return std::move(res.report);
}

inline config_error mone_no_moe_layer() {
  return config_error("mone: the model has no MoE layer (every FFN is dense); convert it first with `moeforge convert cmoe`");
}

struct model_counts {
  index_t moe_layers = 0;
  index_t global_r = 0;  ///< global scope: experts to prune in all
};

// Checks the options against every layer of `w` (see validate(o, w)).
inline model_counts count_model(const model::weights& w, const mone_options& o) {
  using moeforge::detail::cat;
  validate(o);
  model_counts c;
  index_t total_real = 0, most_prunable = 0;
  for (std::size_t l = 0; l < w.layers.size(); ++l)
    if (const auto* m = std::get_if<moe_layer>(&w.layers[l].ffn)) {
      const index_t real = index_t(real_experts(*m).size());
      ++c.moe_layers;
      total_real += real;
      most_prunable += std::max<index_t>(real - 1, 0);
      if (o.scope == mone_scope::layer) layer_prune_count(real, o, cat("layer ", l));
    }
  if (c.moe_layers == 0) throw mone_no_moe_layer();
  if (o.scope == mone_scope::global) {
    c.global_r = o.count ? *o.count : index_t(std::llround(o.ratio * double(total_real)));
    if (c.global_r > most_prunable)
      throw config_error(cat("mone: ", o.count ? cat("count = ", c.global_r) : cat("ratio = ", o.ratio, " (", c.global_r, " experts)"),
                             " is more than global scope can prune: it keeps one real expert in each of the ", c.moe_layers,
                             " MoE layers, so at most ", most_prunable, " of ", total_real));
  }
  return c;
}

}  // namespace detail

/// MoNE (or a baseline) at layer scope on one visited MoE layer: its
/// statistics on the visit's inputs, its choice (method random draws from the
/// layer's own stream), the pruning. The per-layer method that mone_model and
/// the streamed conversion (stream.hpp) share; global scope ranks every
/// layer's experts together, so it has none.
inline mone_layer_report mone_layer(layer_visit& v, const mone_options& o) {
  validate(o);
  if (o.scope != mone_scope::layer)
    throw config_error("mone: scope global ranks the experts of every MoE layer together; one layer alone needs scope layer");
  const detail::planned_layer p = detail::plan_visit(v, o);
  v.stage("prune");
  return detail::apply_planned(v.ffn, p, o);
}

/// Throws config_error unless the options fit the model: it has MoE layers
/// (a dense model must be converted first), and no layer would lose every
/// real expert. What mone_model checks before it touches anything.
inline void validate(const mone_options& o, const model::weights& w) { detail::count_model(w, o); }

/// MoNE (or a baseline) on every MoE layer of `w`, in place, on the driver:
/// each visited layer's statistics come from `inputs` (see
/// mone_options::sequential). Everything validate(o, w) checks is checked
/// before any layer is touched.
inline mone_report mone_model(model::weights& w, const ffn_inputs_fn& inputs, const mone_options& o, const progress_fn& progress = {}) {
  using moeforge::detail::cat;
  const index_t global_r = detail::count_model(w, o).global_r;

  mone_report rep;
  rep.method = std::string(mone_method_name(o.method));
  rep.replacement = std::string(replacement_name(replacement_of(o)));
  rep.scope = std::string(mone_scope_name(o.scope));
  rep.freq = std::string(freq_form_name(o.freq));
  if (o.count)
    rep.count = o.count;
  else
    rep.ratio = o.ratio;
  rep.seed = o.seed;
  // Applying each layer's pruning as soon as it is planned makes the next
  // layer calibrate on the pruned model; deferring it to the end, on the
  // unpruned one — without the copy of the model the driver would make.
  const bool apply_now = o.scope == mone_scope::layer && o.sequential;
  rep.inputs = apply_now ? "sequential" : "unpruned";

  std::vector<detail::planned_layer> deferred;
  visit_options vo;
  vo.filter = layer_filter::moe;
  vo.sequential = true;  // the model as it is during the visit; unpruned until the end unless apply_now
  vo.progress = progress;
  visit_layers(w, inputs, vo, [&](layer_visit& v, double) {
    if (apply_now) {
      rep.layers.push_back(mone_layer(v, o));
      rep.tokens = rep.layers.back().tokens;
    } else {
      deferred.push_back(detail::plan_visit(v, o));
      rep.tokens = deferred.back().stats.tokens;
    }
  });

  if (o.scope == mone_scope::global) {
    // One ranking over (layer, expert): ascending score, ties in layer then
    // expert order (random: one shuffle of that order); an expert is taken
    // unless it is its layer's last real one.
    struct candidate {
      std::size_t layer;
      index_t expert;
    };
    std::vector<candidate> all;
    std::vector<index_t> left(deferred.size());
    for (std::size_t i = 0; i < deferred.size(); ++i) {
      const auto& m = std::get<moe_layer>(w.layers[std::size_t(deferred[i].layer)].ffn);
      deferred[i].plan.scores = detail::ranking_scores(m, deferred[i].stats, o);
      for (index_t e : detail::real_experts(m)) all.push_back({i, e});
      left[i] = index_t(detail::real_experts(m).size());
    }
    auto score = [&](const candidate& c) { return *deferred[c.layer].plan.scores[std::size_t(c.expert)]; };
    if (o.method == mone_method::random) {
      std::vector<index_t> order(all.size());
      std::iota(order.begin(), order.end(), 0);
      std::uint64_t s = o.seed;
      detail::shuffle(order, s);
      std::vector<candidate> shuffled;
      for (index_t i : order) shuffled.push_back(all[std::size_t(i)]);
      all = std::move(shuffled);
    } else {
      std::stable_sort(all.begin(), all.end(), [&](const candidate& a, const candidate& b) { return score(a) < score(b); });
    }
    index_t taken = 0;
    for (const auto& c : all) {
      if (taken == global_r) break;
      if (left[c.layer] <= 1) continue;
      deferred[c.layer].plan.chosen.push_back(c.expert);
      --left[c.layer];
      ++taken;
    }
  }
  for (auto& d : deferred) rep.layers.push_back(detail::apply_planned(w.layers[std::size_t(d.layer)].ffn, d, o));
  for (const auto& l : rep.layers) {
    rep.experts_pruned += index_t(l.pruned.size());
    rep.params_freed += l.params_freed;
    rep.bytes_freed += l.bytes_freed;
  }
  return rep;
}

}  // namespace moeforge::convert
