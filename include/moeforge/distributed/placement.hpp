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

#include "moeforge/detail/json_text.hpp"
#include "moeforge/io/native.hpp"
#include "moeforge/model/eval.hpp"
#include "moeforge/model/transformer.hpp"
#include "moeforge/runtime/routing.hpp"

namespace moeforge::distributed {

/// Who computes an MoE layer's shared experts: every rank (replicated: no
/// bytes to exchange, but every rank pays for them), or one rank per layer
/// (once: the least loaded rank of the layer computes them and sends their
/// outputs with its experts' blocks).
enum class shared_experts { replicated, once };

inline shared_experts parse_shared_experts(const std::string& name) {
  if (name == "once") return shared_experts::once;
  if (name == "replicated") return shared_experts::replicated;
  throw config_error(moeforge::detail::cat("shared experts '", name, "': expected 'once' or 'replicated'"));
}

/// owner[layer][expert]: the rank computing that routed expert; a dense
/// layer's list is empty. shared_owner[layer]: the rank computing the layer's
/// shared experts, or -1 when every rank does (and for a layer without
/// any); empty: -1 everywhere. Everything else (embeddings, attention,
/// routers, novices, compensation) is replicated on every rank.
struct placement {
  int ranks = 1;
  std::vector<std::vector<int>> owner;
  std::vector<int> shared_owner;

  int shared_of(std::size_t layer) const { return shared_owner.empty() ? -1 : shared_owner[layer]; }
};

/// Throws config_error naming `what` unless `owner` places each of layer
/// li's `experts` routed experts on one of `ranks` ranks and `shared_owner`
/// its `shared` shared experts on every rank (-1) or one of them.
inline void validate_layer(const std::vector<int>& owner, int shared_owner, int ranks, std::size_t li, std::size_t experts, std::size_t shared,
                           const std::string& what = "placement") {
  using moeforge::detail::cat;
  if (ranks < 1) throw config_error(cat(what, ": ", ranks, " ranks, expected at least 1"));
  if (owner.size() != experts) throw config_error(cat(what, ": layer ", li, " places ", owner.size(), " experts, the model's layer has ", experts));
  for (std::size_t e = 0; e < experts; ++e)
    if (owner[e] < 0 || owner[e] >= ranks)
      throw config_error(cat(what, ": layer ", li, " expert ", e, " on rank ", owner[e], ", expected 0..", ranks - 1));
  if (shared_owner < -1 || shared_owner >= ranks || (shared == 0 && shared_owner != -1))
    throw config_error(cat(what, ": layer ", li, " computes its shared experts on rank ", shared_owner, ", expected ",
                           shared ? cat("-1 (every rank) or 0..", ranks - 1) : std::string("-1 (the layer has none)")));
}

/// Throws config_error naming `what` unless `p` places every routed and
/// shared expert of `w` (see validate_layer).
inline void validate(const placement& p, const model::weights& w, const std::string& what = "placement") {
  using moeforge::detail::cat;
  if (p.owner.size() != w.layers.size()) throw config_error(cat(what, ": ", p.owner.size(), " layers, the model has ", w.layers.size()));
  if (!p.shared_owner.empty() && p.shared_owner.size() != p.owner.size())
    throw config_error(cat(what, ": shared_owner lists ", p.shared_owner.size(), " layers, owner ", p.owner.size()));
  for (std::size_t li = 0; li < w.layers.size(); ++li) {
    const auto* m = std::get_if<moe_layer>(&w.layers[li].ffn);
    validate_layer(p.owner[li], p.shared_of(li), p.ranks, li, m ? m->experts.size() : 0, m ? m->shared.size() : 0, what);
  }
}

/// One layer's `experts` experts in `ranks` runs of consecutive indices (DualSparse's contiguous groups).
inline std::vector<int> contiguous_owners(index_t experts, int ranks) {
  std::vector<int> owner;
  for (const index_t g : runtime::contiguous_placement(experts, ranks)) owner.push_back(int(g));
  return owner;
}

/// One layer's experts spread so that the ranks' loads are even: heaviest
/// expert first onto the least loaded rank (ties: the lower expert, the
/// lower rank), so the result depends only on the loads.
inline std::vector<int> balanced_owners(const std::vector<double>& load, int ranks) {
  std::vector<int> owner(load.size(), 0);
  std::vector<std::size_t> order(load.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return load[a] > load[b]; });
  std::vector<double> rank_load(std::size_t(ranks), 0.0);
  for (const std::size_t e : order) {
    const auto r = std::size_t(std::min_element(rank_load.begin(), rank_load.end()) - rank_load.begin());
    owner[e] = int(r);
    rank_load[r] += load[e];
  }
  return owner;
}

/// The rank computing layer li's shared experts: -1 (every rank) when
/// replicated or the layer has none, else the rank with the least `load`
/// (each expert's; ones when unknown) on it, ties going to the first from
/// rank li mod ranks on, so equal layers take turns.
inline int shared_owner_of(std::size_t li, const std::vector<int>& owner, const std::vector<double>& load, int ranks, std::size_t shared,
                           shared_experts how) {
  if (how == shared_experts::replicated || shared == 0) return -1;
  std::vector<double> rank_load(std::size_t(ranks), 0.0);
  for (std::size_t e = 0; e < owner.size(); ++e) rank_load[std::size_t(owner[e])] += load.empty() ? 1.0 : load[e];
  int best = int(li % std::size_t(ranks));
  for (int k = 1; k < ranks; ++k) {
    const int r = int((li + std::size_t(k)) % std::size_t(ranks));
    if (rank_load[std::size_t(r)] < rank_load[std::size_t(best)]) best = r;
  }
  return best;
}

/// The default for shared experts. With the ranks in lockstep, computing a
/// layer's shared experts once shortens no rank's path (the owner still does
/// them plus its routed experts) and sends their outputs: on 2 ranks it was
/// no faster at decode or prefill and sent 1.5× the bytes (README). `once`
/// saves the other ranks the shared experts' memory.
inline constexpr shared_experts default_shared_experts = shared_experts::replicated;

/// Each layer's experts in `ranks` runs of consecutive indices (DualSparse's contiguous groups).
inline placement contiguous_placement(const model::weights& w, int ranks, shared_experts shared = default_shared_experts) {
  placement p{ranks, {}, {}};
  for (std::size_t li = 0; li < w.layers.size(); ++li) {
    const auto* m = std::get_if<moe_layer>(&w.layers[li].ffn);
    p.owner.push_back(m ? contiguous_owners(m->num_experts(), ranks) : std::vector<int>());
    p.shared_owner.push_back(shared_owner_of(li, p.owner.back(), {}, ranks, m ? m->shared.size() : 0, shared));
  }
  validate(p, w);
  return p;
}

/// Adds to `load` (per routed expert of m) the work the tokens x route to
/// each expert before any dropping, in neuron products as DualSparse counts
/// group loads.
inline void add_loads(const moe_layer& m, const_matrix_ref x, std::vector<double>& load) {
  std::vector<index_t> own(static_cast<std::size_t>(m.num_experts()));
  std::iota(own.begin(), own.end(), 0);
  const auto work = runtime::group_work(m, runtime::select(m, x), own, m.num_experts(), true);
  load.resize(work.size(), 0.0);
  for (std::size_t e = 0; e < work.size(); ++e) load[e] += work[e];
}

/// Per layer, per routed expert: the work `tokens` route to it (see
/// add_loads; a dense layer's list is empty). The tokens run in windows of
/// the model's context.
inline std::vector<std::vector<double>> expert_loads(const model::transformer& tr, const std::vector<std::int32_t>& tokens) {
  const auto& w = tr.structure();
  std::vector<std::vector<double>> load(w.layers.size());
  model::forward_options o;
  o.all_logits = false;
  o.on_ffn_input = [&](index_t li, const_matrix_ref x) {
    if (const auto* m = std::get_if<moe_layer>(&w.layers[std::size_t(li)].ffn)) add_loads(*m, x, load[std::size_t(li)]);
  };
  for (const auto& window : model::make_windows(tokens, w.config.seq_len)) {
    auto cache = tr.new_cache();
    tr.forward(window, cache, o);
  }
  return load;
}

/// expert_loads one layer at a time, for a model read layer by layer: the
/// hidden states of the calibration windows, which each layer (held whole,
/// in F32, for as long as it runs) advances. Layer by layer the arithmetic
/// is forward()'s, so the loads are expert_loads' bit for bit.
class layer_loads {
 public:
  /// `globals`: the model's config and embedding (see transformer's layer_source).
  layer_loads(const model::weights& globals, const std::vector<std::int32_t>& tokens) : config_(globals.config) {
    for (const auto& window : model::make_windows(tokens, config_.seq_len)) {
      matrix x(index_t(window.size()), config_.dim);
      for (std::size_t t = 0; t < window.size(); ++t) {
        if (window[t] < 0 || window[t] >= config_.vocab_size)
          throw config_error(moeforge::detail::cat("calibration: token ", window[t], " is outside the vocabulary of ", config_.vocab_size));
        x.row(index_t(t)) = globals.tok_emb.row(window[t]);
      }
      states_.push_back(std::move(x));
    }
    if (states_.empty()) throw config_error("calibration: the text has fewer than 2 tokens");
  }

  /// Runs layer `l` (every expert held) on the states and returns its routed
  /// experts' loads (empty for a dense layer). `l` is handed back unchanged.
  std::vector<double> next(model::layer& l) {
    model::weights one = model::layer_model(config_, std::move(l));
    std::vector<double> load;
    {
      const model::transformer tr(one);
      const auto* m = std::get_if<moe_layer>(&one.layers.front().ffn);
      model::forward_options o;
      o.on_ffn_input = [&](index_t, const_matrix_ref x) {
        if (m) add_loads(*m, x, load);
      };
      for (auto& x : states_) tr.layer_step(0, x, o);
    }
    l = std::move(one.layers.front());
    return load;
  }

 private:
  model::config config_;
  std::vector<matrix> states_;  ///< per window [tokens, H]: the next layer's input
};

/// Each layer's experts spread so that the ranks' loads are even (see balanced_owners).
inline placement balanced_placement(const model::weights& w, const std::vector<std::vector<double>>& loads, int ranks,
                                    shared_experts shared = default_shared_experts) {
  if (loads.size() != w.layers.size())
    throw config_error(moeforge::detail::cat("balanced placement: loads of ", loads.size(), " layers, the model has ", w.layers.size()));
  placement p{ranks, {}, {}};
  for (std::size_t li = 0; li < w.layers.size(); ++li) {
    const auto* m = std::get_if<moe_layer>(&w.layers[li].ffn);
    const std::size_t experts = m ? m->experts.size() : 0;
    if (loads[li].size() != experts)
      throw config_error(moeforge::detail::cat("balanced placement: layer ", li, " has loads of ", loads[li].size(), " experts, expected ", experts));
    p.owner.push_back(balanced_owners(loads[li], ranks));
    p.shared_owner.push_back(shared_owner_of(li, p.owner.back(), loads[li], ranks, m ? m->shared.size() : 0, shared));
  }
  validate(p, w);
  return p;
}

inline nlohmann::json to_json(const placement& p) {
  return {{"format", "moeforge-placement"}, {"ranks", p.ranks}, {"owner", p.owner}, {"shared_owner", p.shared_owner}};
}

/// Writes `p` as JSON to `path`, atomically (a temporary file renamed into
/// place; its name is unique, so ranks saving the same path do not mix bytes).
inline void save_placement(const placement& p, const std::string& path) {
  const std::string staged = moeforge::detail::cat(path, ".partial-", std::random_device{}(), std::random_device{}());
  std::error_code ec;
  const auto fail = [&](const std::string& why) {
    std::filesystem::remove(staged, ec);
    throw io_error(why);
  };
  {
    std::ofstream out(staged, std::ios::binary | std::ios::trunc);
    out << moeforge::detail::json_text(to_json(p), 1) << "\n";
    out.close();
    if (!out) fail(moeforge::detail::cat("placement: cannot write '", staged, "'"));
  }
  std::filesystem::rename(staged, path, ec);
  if (ec) fail(moeforge::detail::cat("placement: cannot rename '", staged, "' to '", path, "': ", ec.message()));
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
    // Files from before shared_owner existed replicate every layer's shared experts.
    const io::detail::manifest_reader r(path);
    return {r.get<int>(j, "ranks", "placement"), r.get<std::vector<std::vector<int>>>(j, "owner", "placement"),
            j.contains("shared_owner") ? r.get<std::vector<int>>(j, "shared_owner", "placement") : std::vector<int>()};
  } catch (const nlohmann::json::exception& e) {
    throw format_error(cat(path, ": not a valid placement file (", moeforge::detail::reason(e), ")"));
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

/// A hash of what every rank must agree on: the config, the format the
/// kernels run in (type and token rounding), every replicated tensor (embedding,
/// classifier, norms, attention, dense FFNs, routers and their drop
/// policies, shared experts, novices, compensation), the routed experts'
/// shapes and activations, and the placement. Ranks compare it at start-up:
/// routed experts' weights (which a rank may not hold) are not hashed, so it
/// costs one pass over the replicated weights. Built in the model's order
/// (globals, each layer, the placement), so a model read layer by layer is
/// hashed as it is read, each layer before its plain weights are released.
class fingerprint_builder {
 public:
  /// The config, the weight types and the tensors outside the layers.
  void globals(const model::weights& w, const runtime::detail::weight_format& run) {
    const auto& c = w.config;
    h_.text(c.arch);
    for (const index_t v : {c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.seq_len}) h_.value(std::int64_t(v));
    h_.value(c.norm_eps);
    h_.value(c.rope_theta);
    h_.value(c.rope);
    h_.value(c.tied_embeddings);
    h_.value(c.bos_token);
    h_.value(c.eos_token);
    h_.value(int(w.weight_dtype));
    h_.value(int(run.type));
    h_.value(run.round_tokens);
    h_.values(w.tok_emb);
    h_.values(w.lm_head);
    h_.values(w.final_norm);
  }

  /// The next layer: its replicated tensors and its routed experts' shapes
  /// (their weights may be released).
  void layer(const model::layer& l) {
    const auto hash_ffn = [this](const ffn& f) {
      h_.value(f.act);
      for (const auto* m : {&f.gate, &f.up, &f.down}) h_.values(*m);
    };
    h_.values(l.ffn_norm);
    h_.values(l.attn_norm);
    for (const auto* m : {&l.wq, &l.wk, &l.wv, &l.wo}) h_.values(*m);
    for (const auto* b : {&l.bq, &l.bk, &l.bv}) h_.values(*b);
    if (const auto* f = std::get_if<ffn>(&l.ffn)) return hash_ffn(*f);
    const auto& m = std::get<moe_layer>(l.ffn);
    const auto& r = m.router;
    h_.value(r.kind);
    h_.value(std::int64_t(r.top_k));
    h_.value(r.renormalize);
    h_.value(r.scale);
    for (const auto* part : {&r.weight, &r.weight_up, &r.projection, &r.weight_quad}) h_.values(*part);
    h_.values(r.bias);
    h_.values(r.projection_bias);
    h_.value(r.drop.kind);
    h_.value(r.drop.threshold);
    h_.value(r.drop.margin);
    for (const float f : r.drop.expert_factor) h_.value(f);
    for (const auto& e : m.experts) {
      h_.value(std::int64_t(e.width()));
      h_.value(std::int64_t(e.major_width()));
      h_.value(e.weights.gated());
      h_.value(e.weights.act);
      h_.value(e.is_novice());
      for (const index_t cut : e.parts) h_.value(std::int64_t(cut));
      if (e.is_novice()) h_.values(e.novice);
    }
    for (const auto& sh : m.shared) {
      hash_ffn(sh.weights);
      h_.values(sh.gate);
    }
    h_.values(m.compensation.bias);
    h_.values(m.compensation.means);
  }

  /// The placement, last; returns the fingerprint.
  std::uint64_t finish(const placement& p) {
    h_.value(p.ranks);
    for (const auto& layer : p.owner) {
      h_.value(layer.size());
      for (const int o : layer) h_.value(o);
    }
    for (std::size_t li = 0; li < p.owner.size(); ++li) h_.value(p.shared_of(li));
    return h_.get();
  }

 private:
  detail::fingerprint_hash h_;
};

/// The fingerprint of a model in memory (see fingerprint_builder).
inline std::uint64_t fingerprint(const model::weights& w, const placement& p, const runtime::detail::weight_format& run) {
  fingerprint_builder f;
  f.globals(w, run);
  for (const auto& l : w.layers) f.layer(l);
  return f.finish(p);
}

}  // namespace moeforge::distributed
