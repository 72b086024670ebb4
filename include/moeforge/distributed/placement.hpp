// Expert placement for expert parallelism: which process (rank) computes each
// routed expert of every MoE layer. Plain data and MPI-free, so placements can
// be made, saved and checked without MPI; distributed/expert_parallel.hpp runs
// a model under one.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/model/eval.hpp"
#include "moeforge/model/transformer.hpp"
#include "moeforge/runtime/routing.hpp"

namespace moeforge::distributed {

/// owner[layer][expert]: the rank computing that routed expert; a dense
/// layer's list is empty. Everything else (embeddings, attention, routers,
/// shared experts, novices, compensation) is replicated on every rank.
struct placement {
  int ranks = 1;
  std::vector<std::vector<int>> owner;
};

/// Throws config_error naming `what` unless `p` places every routed expert of
/// `w` on one of its ranks.
inline void validate(const placement& p, const model::weights& w, const std::string& what = "placement") {
  using moeforge::detail::cat;
  if (p.ranks < 1) throw config_error(cat(what, ": ", p.ranks, " ranks, expected at least 1"));
  if (p.owner.size() != w.layers.size())
    throw config_error(cat(what, ": ", p.owner.size(), " layers, the model has ", w.layers.size()));
  for (std::size_t li = 0; li < w.layers.size(); ++li) {
    const auto* m = std::get_if<moe_layer>(&w.layers[li].ffn);
    const std::size_t experts = m ? m->experts.size() : 0;
    if (p.owner[li].size() != experts)
      throw config_error(cat(what, ": layer ", li, " places ", p.owner[li].size(), " experts, the model's layer has ", experts));
    for (std::size_t e = 0; e < experts; ++e)
      if (p.owner[li][e] < 0 || p.owner[li][e] >= p.ranks)
        throw config_error(cat(what, ": layer ", li, " expert ", e, " on rank ", p.owner[li][e], ", expected 0..", p.ranks - 1));
  }
}

/// Each layer's experts in `ranks` runs of consecutive indices (DualSparse's contiguous groups).
inline placement contiguous_placement(const model::weights& w, int ranks) {
  placement p{ranks, {}};
  for (const auto& l : w.layers) {
    const auto* m = std::get_if<moe_layer>(&l.ffn);
    p.owner.emplace_back();
    if (!m) continue;
    for (const index_t g : runtime::contiguous_placement(m->num_experts(), ranks)) p.owner.back().push_back(int(g));
  }
  validate(p, w);
  return p;
}

/// Per layer, per routed expert: the work `tokens` route to it before any
/// dropping, in neuron products as DualSparse counts group loads (a dense
/// layer's list is empty). The tokens run in windows of the model's context.
inline std::vector<std::vector<double>> expert_loads(const model::transformer& tr, const std::vector<std::int32_t>& tokens) {
  const auto& w = tr.structure();
  std::vector<std::vector<double>> load(w.layers.size());
  model::forward_options o;
  o.all_logits = false;
  o.on_ffn_input = [&](index_t li, const_matrix_ref x) {
    const auto* m = std::get_if<moe_layer>(&w.layers[std::size_t(li)].ffn);
    if (!m) return;
    std::vector<index_t> own(static_cast<std::size_t>(m->num_experts()));
    std::iota(own.begin(), own.end(), 0);
    const auto work = runtime::group_work(*m, runtime::select(*m, x), own, m->num_experts(), true);
    auto& l = load[std::size_t(li)];
    l.resize(work.size(), 0.0);
    for (std::size_t e = 0; e < work.size(); ++e) l[e] += work[e];
  };
  for (const auto& window : model::make_windows(tokens, w.config.seq_len)) {
    auto cache = tr.new_cache();
    tr.forward(window, cache, o);
  }
  return load;
}

/// Each layer's experts spread so that the ranks' loads are even: heaviest
/// expert first onto the least loaded rank (ties: the lower expert, the
/// lower rank), so the result depends only on the loads.
inline placement balanced_placement(const model::weights& w, const std::vector<std::vector<double>>& loads, int ranks) {
  placement p = contiguous_placement(w, ranks);
  if (loads.size() != w.layers.size())
    throw config_error(moeforge::detail::cat("balanced placement: loads of ", loads.size(), " layers, the model has ", w.layers.size()));
  for (std::size_t li = 0; li < w.layers.size(); ++li) {
    auto& owner = p.owner[li];
    if (owner.empty()) continue;
    const auto& load = loads[li];
    if (load.size() != owner.size())
      throw config_error(moeforge::detail::cat("balanced placement: layer ", li, " has loads of ", load.size(), " experts, expected ", owner.size()));
    std::vector<std::size_t> order(owner.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return load[a] > load[b]; });
    std::vector<double> rank_load(std::size_t(ranks), 0.0);
    for (const std::size_t e : order) {
      const auto r = std::size_t(std::min_element(rank_load.begin(), rank_load.end()) - rank_load.begin());
      owner[e] = int(r);
      rank_load[r] += load[e];
    }
  }
  return p;
}

inline nlohmann::json to_json(const placement& p) {
  return {{"format", "moeforge-placement"}, {"ranks", p.ranks}, {"owner", p.owner}};
}

/// Writes `p` as JSON to `path`, atomically (a temporary file renamed into
/// place; its name is unique, so ranks saving the same path do not mix bytes).
inline void save_placement(const placement& p, const std::string& path) {
  const std::string staged = moeforge::detail::cat(path, ".partial-", std::random_device{}(), std::random_device{}());
  {
    std::ofstream out(staged, std::ios::binary | std::ios::trunc);
    out << to_json(p).dump(1) << "\n";
    if (!out.flush()) throw io_error(moeforge::detail::cat("placement: cannot write '", staged, "'"));
  }
  std::error_code ec;
  std::filesystem::rename(staged, path, ec);
  if (ec) throw io_error(moeforge::detail::cat("placement: cannot rename '", staged, "' to '", path, "': ", ec.message()));
}

/// Reads a placement file; throws io_error / format_error naming the file.
inline placement load_placement(const std::string& path) {
  using moeforge::detail::cat;
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io_error(cat("placement: cannot open '", path, "'"));
  try {
    const auto j = nlohmann::json::parse(in);
    if (j.value("format", "") != "moeforge-placement")
      throw format_error(cat(path, ": not a placement file (expected \"format\": \"moeforge-placement\")"));
    return {j.at("ranks").get<int>(), j.at("owner").get<std::vector<std::vector<int>>>()};
  } catch (const nlohmann::json::exception& e) {
    throw format_error(cat(path, ": not a valid placement file (", e.what(), ")"));
  }
}

namespace detail {

/// FNV-1a, 64-bit.
class fingerprint_hash {
 public:
  void bytes(const void* data, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < n; ++i) h_ = (h_ ^ b[i]) * 1099511628211ull;
  }
  template <class T>
  void value(const T& v) {
    static_assert(std::is_arithmetic_v<T> || std::is_enum_v<T>);
    bytes(&v, sizeof v);
  }
  template <class M>
  void values(const M& m) {
    value(std::int64_t(m.rows()));
    value(std::int64_t(m.cols()));
    bytes(m.data(), sizeof(float) * std::size_t(m.size()));
  }
  void text(const std::string& s) {
    value(s.size());
    bytes(s.data(), s.size());
  }
  std::uint64_t get() const { return h_; }

 private:
  std::uint64_t h_ = 14695981039346656037ull;
};

}  // namespace detail

/// A hash of what every rank must agree on: the config, the type the
/// kernels run in (`run_dtype`), every replicated tensor (embedding,
/// classifier, norms, attention, dense FFNs, routers and their drop
/// policies, shared experts, novices, compensation), the routed experts'
/// shapes, and the placement. Ranks compare it at start-up: routed experts'
/// weights (which a rank may not hold) are not hashed, so it costs one pass
/// over the replicated weights.
inline std::uint64_t fingerprint(const model::weights& w, const placement& p, dtype run_dtype) {
  detail::fingerprint_hash h;
  const auto& c = w.config;
  h.text(c.arch);
  for (const index_t v : {c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.seq_len}) h.value(std::int64_t(v));
  h.value(c.norm_eps);
  h.value(c.rope_theta);
  h.value(c.tied_embeddings);
  h.value(int(w.weight_dtype));
  h.value(int(run_dtype));
  h.values(w.tok_emb);
  h.values(w.lm_head);
  h.values(w.final_norm);
  const auto hash_ffn = [&h](const ffn& f) {
    h.value(f.act);
    for (const auto* m : {&f.gate, &f.up, &f.down}) h.values(*m);
  };
  for (const auto& l : w.layers) {
    h.values(l.ffn_norm);
    h.values(l.attn_norm);
    for (const auto* m : {&l.wq, &l.wk, &l.wv, &l.wo}) h.values(*m);
    for (const auto* b : {&l.bq, &l.bk, &l.bv}) h.values(*b);
    if (const auto* f = std::get_if<ffn>(&l.ffn)) {
      hash_ffn(*f);
      continue;
    }
    const auto& m = std::get<moe_layer>(l.ffn);
    const auto& r = m.router;
    h.value(r.kind);
    h.value(std::int64_t(r.top_k));
    h.value(r.renormalize);
    h.value(r.scale);
    for (const auto* part : {&r.weight, &r.weight_up, &r.projection, &r.weight_quad}) h.values(*part);
    h.values(r.bias);
    h.values(r.projection_bias);
    h.value(r.drop.kind);
    h.value(r.drop.threshold);
    h.value(r.drop.margin);
    for (const float f : r.drop.expert_factor) h.value(f);
    for (const auto& e : m.experts) {
      h.value(std::int64_t(e.width()));
      h.value(std::int64_t(e.major_width()));
      h.value(e.weights.gated());
      h.value(e.is_novice());
      for (const index_t cut : e.parts) h.value(std::int64_t(cut));
      if (e.is_novice()) h.values(e.novice);
    }
    for (const auto& s : m.shared) {
      hash_ffn(s.weights);
      h.values(s.gate);
    }
    h.values(m.compensation.bias);
    h.values(m.compensation.means);
  }
  h.value(p.ranks);
  for (const auto& layer : p.owner) {
    h.value(layer.size());
    for (const int o : layer) h.value(o);
  }
  return h.get();
}

}  // namespace moeforge::distributed
