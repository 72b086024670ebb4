// moeforge's native model format: a directory holding the tensors and
// `moeforge.json` (the config, what each layer is, and where the model came
// from). The tensors are one `model.safetensors` (save_native: matrices in
// the model's stored_dtype() where that loses nothing, else F32), or
// shards `model-0000k-of-0000N.safetensors` listed by
// `model.safetensors.index.json` as Hugging Face shards them (a streamed
// conversion, native_shard_writer: each tensor in its source's dtype, F32,
// F16 or BF16), or, in a packed directory (io/packed.hpp), the weight
// matrices as kernel panels. The loader reads all three and widens F16/BF16
// to F32 (a packed directory's panels unpacked). It round-trips every model
// moeforge can build, including the CMoE analytic router and MoNE novices
// that have no Hugging Face equivalent.
//
// moeforge.json:
//   {"format": "moeforge", "version": 1,
//    "config": {"arch", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
//               "vocab_size", "seq_len", "norm_eps", "rope_theta",
//               "rope": "interleaved"|"half_split", "tied_embeddings",
//               "bos_token", "eos_token"},
//    "layers": [{"ffn": "dense", "act": "silu", "gated": true}
//             | {"ffn": "moe", "router": {"kind", "top_k", "renormalize", "scale",
//                                         "drop": {"policy", "threshold", "margin", "expert_factor"}},
//                "experts": [{"novice": false, "major": 0, "parts": [], "act", "gated"}, ...],
//                "shared": [{"act", "gated", "sigmoid_gate": false}, ...],
//                "compensation": false}],
//    "provenance": {...}}   // free-form: source model, conversion report, calibration
// "drop", "parts" (DualSparse) and "compensation" are optional on reading: a
// model written before they existed has no dropping, one sub-expert per expert
// and no novice compensation.
//
// Tensor names (row-major, [out, in] like Hugging Face):
//   tok_emb [V,H], final_norm [H], lm_head [V,H] (absent when tied),
//   layers.L.{attn_norm, ffn_norm, wq, wk, wv, wo, bq, bk, bv (optional)},
//   dense FFN:  layers.L.ffn.{gate, up, down}
//   MoE:        layers.L.moe.router.weight, layers.L.moe.router.weight_up (cmoe_analytic),
//               layers.L.moe.router.bias (linear_topk, quadratic_topk),
//               layers.L.moe.router.{projection, projection_bias, weight_quad} (quadratic_topk),
//               layers.L.moe.compensation.{bias, means} (when "compensation" is true),
//               layers.L.moe.experts.E.{gate, up, down} or layers.L.moe.experts.E.novice,
//               layers.L.moe.shared.S.{gate, up, down, sigmoid_gate}
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <stdexcept>
#include <system_error>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/detail/temporaries.hpp"
#include "moeforge/io/expert_filter.hpp"
#include "moeforge/io/safetensors.hpp"
#include "moeforge/model/transformer.hpp"

namespace moeforge::io {

inline constexpr int native_version = 1;
inline constexpr const char* native_manifest = "moeforge.json";
inline constexpr const char* native_tensors = "model.safetensors";

struct native_save_options {
  /// Replace an existing directory (only once the new one is complete).
  bool overwrite = false;
  /// Files copied into the directory as (source path, name inside it), e.g. the tokenizer.
  std::vector<std::pair<std::string, std::string>> attachments;
  /// The type every tensor is stored in, rounded to nearest even: what a
  /// conversion of a BF16 or F16 model writes (its new values computed in
  /// F32, stored as its source was, as a streamed conversion stores them). By
  /// default nothing is rounded: matrices in detail::stored_matrix_dtype(w),
  /// vectors in F32.
  std::optional<dtype> stored;
  /// Store each tensor as the file the model was loaded from stored it, where
  /// the loader recorded that (model::layer::file_dtypes): a tensor the
  /// conversion made (a split FFN's experts, a router, a novice) in the type
  /// of the FFN it came from (detail::as_source_type), and a model without a
  /// record (built in memory, or read from a packed directory) as `stored`
  /// says. What a conversion writes, as a streamed one writes it, so a
  /// checkpoint mixing types (F32 norms or routers beside BF16 matrices)
  /// keeps each tensor's, and a value the file held is never rounded.
  bool as_source = false;
};

/// True when `dir` looks like a native model directory.
inline bool is_native_dir(const std::string& dir) {
  return std::filesystem::is_regular_file(std::filesystem::path(dir) / native_manifest);
}

namespace detail {

/// Weight matrices a reader handed out unread, each with where its values
/// are in the mapped files: their storage is reserved but never written (so
/// never faulted in), and the transformer packs them straight from the file
/// (model::transformer's `unread`, through lookup()). Loading a BF16 model
/// then reads each weight once and writes its panel once, instead of
/// widening it into an F32 copy first. Valid while the files stay mapped.
class unread_matrices {
 public:
  /// Records `m`, handed out unread, as tensor `tensor` whose values are at `where`.
  void add(const matrix& m, runtime::detail::weight_rows where, std::string tensor) {
    by_data_[m.data()] = {std::move(where), std::move(tensor), false};
  }
  /// Forgets what was handed out (before the next layer reuses the storage),
  /// after checking that every matrix was looked up: one that was not (its
  /// storage moved, or it was never packed) would run on values never written.
  void clear() {
    for (const auto& [data, e] : by_data_)
      if (!e.looked_up)
        throw std::logic_error("moeforge: weight '" + e.tensor + "' was handed out unread but never packed from its file");
    by_data_.clear();
  }
  /// Where a matrix's values are: in the file if it was handed out unread, else
  /// its own. Safe from several threads at once, each asking for other matrices.
  runtime::detail::rows_lookup lookup() {
    return [this](const matrix& m) {
      const auto it = by_data_.find(m.data());
      if (it == by_data_.end()) return runtime::detail::source_of(m);
      it->second.looked_up = true;
      return it->second.where;
    };
  }

 private:
  struct entry {
    runtime::detail::weight_rows where;
    std::string tensor;
    bool looked_up;
  };
  std::map<const float*, entry> by_data_;
};

using moeforge::detail::cat;

/// Calls `on_matrix(name, m)` / `on_vector(name, v)` for every tensor slot of
/// layer `i` of a model in one fixed order. Optional tensors (biases, a dense
/// FFN's gate when ungated) are visited only when the layer description says
/// they exist, so the same walk serves saving and loading.
template <class Layer, class OnMatrix, class OnVector>
void for_each_layer_tensor(std::size_t i, Layer& l, OnMatrix&& on_matrix, OnVector&& on_vector) {
  auto ffn_tensors = [&](const std::string& prefix, auto& f) {
    if (f.gated()) on_matrix(prefix + ".gate", f.gate);
    on_matrix(prefix + ".up", f.up);
    on_matrix(prefix + ".down", f.down);
  };
  const std::string p = cat("layers.", i);
  on_vector(p + ".attn_norm", l.attn_norm);
  on_vector(p + ".ffn_norm", l.ffn_norm);
  on_matrix(p + ".wq", l.wq);
  on_matrix(p + ".wk", l.wk);
  on_matrix(p + ".wv", l.wv);
  on_matrix(p + ".wo", l.wo);
  if (l.bq.size()) on_vector(p + ".bq", l.bq);
  if (l.bk.size()) on_vector(p + ".bk", l.bk);
  if (l.bv.size()) on_vector(p + ".bv", l.bv);
  if (auto* f = std::get_if<ffn>(&l.ffn)) {
    ffn_tensors(p + ".ffn", *f);
    return;
  }
  auto& m = std::get<moe_layer>(l.ffn);
  on_matrix(p + ".moe.router.weight", m.router.weight);
  if (m.router.kind == router_kind::cmoe_analytic) on_matrix(p + ".moe.router.weight_up", m.router.weight_up);
  if (m.router.fitted() && m.router.bias.size()) on_vector(p + ".moe.router.bias", m.router.bias);
  if (m.router.kind == router_kind::quadratic_topk && m.router.rank() > 0) {
    on_matrix(p + ".moe.router.projection", m.router.projection);
    on_vector(p + ".moe.router.projection_bias", m.router.projection_bias);
    on_matrix(p + ".moe.router.weight_quad", m.router.weight_quad);
  }
  if (m.compensation.active()) {
    on_vector(p + ".moe.compensation.bias", m.compensation.bias);
    on_matrix(p + ".moe.compensation.means", m.compensation.means);
  }
  for (std::size_t e = 0; e < m.experts.size(); ++e) {
    const std::string q = cat(p, ".moe.experts.", e);
    if (m.experts[e].is_novice())
      on_vector(q + ".novice", m.experts[e].novice);
    else
      ffn_tensors(q, m.experts[e].weights);
  }
  for (std::size_t s = 0; s < m.shared.size(); ++s) {
    const std::string q = cat(p, ".moe.shared.", s);
    ffn_tensors(q, m.shared[s].weights);
    if (m.shared[s].gated()) on_vector(q + ".sigmoid_gate", m.shared[s].gate);
  }
}

/// The tensors of the model outside its layers, in the same spirit.
template <class Weights, class OnMatrix, class OnVector>
void for_each_global_tensor(Weights& w, OnMatrix&& on_matrix, OnVector&& on_vector) {
  on_matrix("tok_emb", w.tok_emb);
  on_vector("final_norm", w.final_norm);
  if (!w.config.tied_embeddings) on_matrix("lm_head", w.lm_head);
}

/// A layer tensor's name without its "layers.N." prefix: how
/// model::layer::file_dtypes keys it.
inline std::string name_in_layer(const std::string& name) { return name.substr(name.find('.', 7) + 1); }

/// The type `recorded` (a file_dtypes) holds for the first of `keys` it has, else `otherwise`.
inline dtype recorded_type(const std::map<std::string, dtype>& recorded, std::initializer_list<std::string> keys, dtype otherwise) {
  for (const auto& key : keys)
    if (const auto it = recorded.find(key); it != recorded.end()) return it->second;
  return otherwise;
}

/// The type a conversion stores tensor `name` (its name within the layer) of
/// layer `l` in (native_save_options::as_source): the type its file stored it
/// in, else, for a tensor the conversion made (experts of a split FFN,
/// routers, novices), that of the FFN it came from, else the layer's.
inline dtype as_source_type(const model::layer& l, const std::string& name, dtype otherwise) {
  return recorded_type(l.file_dtypes, {name, "ffn.up", "moe.experts.0.up", "moe.shared.0.up", "wq"}, otherwise);
}

/// Every tensor slot of `w`: the global ones, then each layer's.
template <class Weights, class OnMatrix, class OnVector>
void for_each_tensor(Weights& w, OnMatrix&& on_matrix, OnVector&& on_vector) {
  for_each_global_tensor(w, on_matrix, on_vector);
  for (std::size_t i = 0; i < w.layers.size(); ++i) for_each_layer_tensor(i, w.layers[i], on_matrix, on_vector);
}

/// The type `w`'s matrices are written in: its stored_dtype() when every
/// value is exact in it, so a BF16 model stays BF16 (half the bytes, and it
/// reloads to run as BF16 again), an F16 one F16, and nothing is ever
/// rounded; else F32 (a model edited in F32 after loading, such as a CMoE
/// conversion's new routers; a conversion that only moves values, such as
/// DualSparse's partition, stays in the file's type).
inline dtype stored_matrix_dtype(const model::weights& w) {
  const dtype type = w.stored_dtype();
  if (type == dtype::f32) return type;
  bool exact = true;
  for_each_tensor(
      w, [&](const std::string&, const matrix& m) { exact = exact && exact_in(type, m.data(), std::size_t(m.size())); },
      [](const std::string&, const vector&) {});
  return exact ? type : dtype::f32;
}

/// Every tensor of `w` that holds values, as safetensors views (an owning
/// transformer's structure has empty matrices where its panels are), stored
/// as `stored` and `as_source` say (see native_save_options) or by default
/// matrices in stored_matrix_dtype(w), vectors in F32.
inline std::vector<tensor_view> tensor_views(const model::weights& w, std::optional<dtype> stored = std::nullopt, bool as_source = false) {
  std::vector<tensor_view> views;
  const dtype matrices = stored ? *stored : stored_matrix_dtype(w), vectors = stored.value_or(dtype::f32);
  // Adds tensor `name`'s view, in the type `source_type(otherwise)` gives when as_source.
  const auto add = [&](const std::string& name, const auto& t, const auto& source_type) {
    constexpr bool is_vector = std::is_same_v<std::decay_t<decltype(t)>, vector>;
    const dtype otherwise = is_vector ? vectors : matrices;
    const dtype type = as_source ? source_type(otherwise) : otherwise;
    if constexpr (is_vector)
      views.push_back({name, {t.size()}, t.data(), type});
    else if (t.size())
      views.push_back({name, {t.rows(), t.cols()}, t.data(), type});
  };
  const auto global = [&](const std::string& name, const auto& t) {
    add(name, t, [&](dtype otherwise) { return recorded_type(w.file_dtypes, {name}, otherwise); });
  };
  for_each_global_tensor(w, global, global);
  for (std::size_t i = 0; i < w.layers.size(); ++i) {
    const auto in_layer = [&](const std::string& name, const auto& t) {
      add(name, t, [&](dtype otherwise) { return as_source_type(w.layers[i], name_in_layer(name), otherwise); });
    };
    for_each_layer_tensor(i, w.layers[i], in_layer, in_layer);
  }
  return views;
}

inline const char* rope_name(model::rope_style r) { return r == model::rope_style::interleaved ? "interleaved" : "half_split"; }

inline nlohmann::json config_json(const model::config& c) {
  return {{"arch", c.arch},           {"dim", c.dim},
          {"n_layers", c.n_layers},   {"n_heads", c.n_heads},
          {"n_kv_heads", c.n_kv_heads}, {"head_dim", c.head_dim},
          {"vocab_size", c.vocab_size}, {"seq_len", c.seq_len},
          {"norm_eps", c.norm_eps},   {"rope_theta", c.rope_theta},
          {"rope", rope_name(c.rope)}, {"tied_embeddings", c.tied_embeddings},
          {"bos_token", c.bos_token}, {"eos_token", c.eos_token}};
}

/// Whether a stored dense FFN (or expert) is gated is a property of the slot,
/// so an empty gate matrix is recorded rather than guessed on load.
inline nlohmann::json ffn_json(const ffn& f) { return {{"act", std::string(activation_name(f.act))}, {"gated", f.gated()}}; }

inline nlohmann::json layer_json(const model::layer& l) {
  if (const auto* f = std::get_if<ffn>(&l.ffn)) {
    auto j = ffn_json(*f);
    j["ffn"] = "dense";
    return j;
  }
  const auto& m = std::get<moe_layer>(l.ffn);
  if (m.router.kind == router_kind::oracle) throw config_error("native: an oracle router is a diagnostic and is not stored");
  nlohmann::json experts = nlohmann::json::array(), shared = nlohmann::json::array();
  for (const auto& e : m.experts) {
    nlohmann::json j = e.is_novice() ? nlohmann::json{{"novice", true}} : ffn_json(e.weights);
    if (!e.is_novice()) {
      j["novice"] = false;
      j["major"] = e.major;
      j["parts"] = e.parts;
    }
    experts.push_back(std::move(j));
  }
  for (const auto& s : m.shared) {
    auto j = ffn_json(s.weights);
    j["sigmoid_gate"] = s.gated();
    shared.push_back(std::move(j));
  }
  return {{"ffn", "moe"},
          {"router",
           {{"kind", std::string(router_kind_name(m.router.kind))},
            {"top_k", m.router.top_k},
            {"renormalize", m.router.renormalize},
            {"scale", m.router.scale},
            {"drop",
             {{"policy", std::string(drop_kind_name(m.router.drop.kind))},
              {"threshold", m.router.drop.threshold},
              {"margin", m.router.drop.margin},
              {"expert_factor", m.router.drop.expert_factor}}}}},
          {"experts", std::move(experts)},
          {"shared", std::move(shared)},
          {"compensation", m.compensation.active()}};
}

template <class T>
struct is_vector : std::false_type {};
template <class T>
struct is_vector<std::vector<T>> : std::true_type {};

/// Sets `out` to `v` when v holds a T exactly: nlohmann's get<T> would take
/// a fraction, a boolean or an integer past T's range and convert it.
template <class T>
bool exact_json_value(const nlohmann::json& v, T& out) {
  if constexpr (std::is_same_v<T, bool>) {
    if (!v.is_boolean()) return false;
  } else if constexpr (std::is_integral_v<T>) {
    if (v.is_number_unsigned()) {
      if (v.get<std::uint64_t>() > std::uint64_t(std::numeric_limits<T>::max())) return false;
    } else {
      if (!v.is_number_integer()) return false;
      const auto i = v.get<std::int64_t>();
      if constexpr (std::is_signed_v<T>) {
        if (i < std::int64_t(std::numeric_limits<T>::min()) || i > std::int64_t(std::numeric_limits<T>::max())) return false;
      } else if (i < 0) {
        return false;
      }
    }
  } else if constexpr (std::is_floating_point_v<T>) {
    if (!v.is_number()) return false;
  } else if constexpr (is_vector<T>::value) {
    if (!v.is_array()) return false;
    out.resize(v.size());
    for (std::size_t i = 0; i < v.size(); ++i)
      if (!exact_json_value(v[i], out[i])) return false;
    return true;
  }
  out = v.get<T>();
  return true;
}

/// Reads one field of moeforge.json with a message naming it and the expected type.
class manifest_reader {
 public:
  explicit manifest_reader(std::string file) : file_(std::move(file)) {}

  const nlohmann::json& at(const nlohmann::json& obj, const std::string& key, const std::string& where) const {
    if (!obj.is_object() || !obj.contains(key)) throw format_error(cat(file_, ": ", where, ": missing key '", key, "'"));
    return obj.at(key);
  }
  template <class T>
  T get(const nlohmann::json& obj, const std::string& key, const std::string& where) const {
    const auto& v = at(obj, key, where);
    T out{};
    try {
      if (exact_json_value(v, out)) return out;
    } catch (const nlohmann::json::exception&) {
    }
    throw format_error(cat(file_, ": ", where, ".", key, " = ", v.dump(), " has the wrong type"));
  }
  const nlohmann::json& array(const nlohmann::json& obj, const std::string& key, const std::string& where) const {
    const auto& v = at(obj, key, where);
    if (!v.is_array()) throw format_error(cat(file_, ": ", where, ".", key, " must be an array"));
    return v;
  }
  [[noreturn]] void fail(const std::string& message) const { throw format_error(cat(file_, ": ", message)); }
  const std::string& file() const { return file_; }

 private:
  std::string file_;
};

inline model::config parse_config(const manifest_reader& r, const nlohmann::json& j) {
  model::config c;
  const std::string w = "config";
  c.arch = r.get<std::string>(j, "arch", w);
  c.dim = r.get<index_t>(j, "dim", w);
  c.n_layers = r.get<index_t>(j, "n_layers", w);
  c.n_heads = r.get<index_t>(j, "n_heads", w);
  c.n_kv_heads = r.get<index_t>(j, "n_kv_heads", w);
  c.head_dim = r.get<index_t>(j, "head_dim", w);
  c.vocab_size = r.get<index_t>(j, "vocab_size", w);
  c.seq_len = r.get<index_t>(j, "seq_len", w);
  c.norm_eps = r.get<float>(j, "norm_eps", w);
  c.rope_theta = r.get<float>(j, "rope_theta", w);
  const auto rope = r.get<std::string>(j, "rope", w);
  if (rope != "interleaved" && rope != "half_split")
    r.fail(cat("config.rope = '", rope, "', expected 'interleaved' or 'half_split'"));
  c.rope = rope == "interleaved" ? model::rope_style::interleaved : model::rope_style::half_split;
  c.tied_embeddings = r.get<bool>(j, "tied_embeddings", w);
  c.bos_token = r.get<std::int32_t>(j, "bos_token", w);
  c.eos_token = r.get<std::int32_t>(j, "eos_token", w);
  return c;
}

/// An empty FFN whose gatedness is known, so for_each_tensor visits the right slots.
inline ffn ffn_skeleton(const manifest_reader& r, const nlohmann::json& j, const std::string& where) {
  ffn f;
  try {
    f.act = parse_activation(r.get<std::string>(j, "act", where));
  } catch (const config_error& e) {
    r.fail(cat(where, ": ", moeforge::detail::reason(e)));
  }
  // A non-empty placeholder marks the gate slot; the loader replaces it.
  if (r.get<bool>(j, "gated", where)) f.gate.resize(1, 1);
  return f;
}

inline router_kind parse_router_kind(const manifest_reader& r, const std::string& name, const std::string& where) {
  for (auto k : all_router_kinds)
    if (name == router_kind_name(k)) return k;
  r.fail(cat(where, ".kind = '", name, "' is not a router kind this build knows"));
}

inline model::layer layer_skeleton(const manifest_reader& r, const nlohmann::json& j, const std::string& where) {
  model::layer l;
  const auto kind = r.get<std::string>(j, "ffn", where);
  if (kind == "dense") {
    l.ffn = ffn_skeleton(r, j, where);
    return l;
  }
  if (kind != "moe") r.fail(cat(where, ".ffn = '", kind, "', expected 'dense' or 'moe'"));
  moe_layer m;
  const auto& rj = r.at(j, "router", where);
  const std::string rw = where + ".router";
  m.router.kind = parse_router_kind(r, r.get<std::string>(rj, "kind", rw), rw);
  m.router.top_k = r.get<index_t>(rj, "top_k", rw);
  m.router.renormalize = r.get<bool>(rj, "renormalize", rw);
  m.router.scale = r.get<float>(rj, "scale", rw);
  if (rj.contains("drop")) {
    const auto& dj = r.at(rj, "drop", rw);
    const std::string dw = rw + ".drop";
    try {
      m.router.drop.kind = parse_drop_kind(r.get<std::string>(dj, "policy", dw));
    } catch (const config_error& e) {
      r.fail(cat(dw, ": ", moeforge::detail::reason(e)));
    }
    m.router.drop.threshold = r.get<float>(dj, "threshold", dw);
    m.router.drop.margin = r.get<float>(dj, "margin", dw);
    m.router.drop.expert_factor = r.get<std::vector<float>>(dj, "expert_factor", dw);
  }
  // A model written before novice compensation existed has none.
  if (j.contains("compensation") && r.get<bool>(j, "compensation", where)) m.compensation.bias.resize(1);  // placeholder
  const auto& experts = r.array(j, "experts", where);
  for (std::size_t e = 0; e < experts.size(); ++e) {
    const std::string ew = cat(where, ".experts[", e, "]");
    routed_expert x;
    if (r.get<bool>(experts[e], "novice", ew)) {
      x.novice.resize(1);  // placeholder: marks the novice slot
    } else {
      x.weights = ffn_skeleton(r, experts[e], ew);
      x.major = r.get<index_t>(experts[e], "major", ew);
      if (experts[e].contains("parts")) x.parts = r.get<std::vector<index_t>>(experts[e], "parts", ew);
    }
    m.experts.push_back(std::move(x));
  }
  const auto& shared = r.array(j, "shared", where);
  for (std::size_t s = 0; s < shared.size(); ++s) {
    const std::string sw = cat(where, ".shared[", s, "]");
    shared_expert x;
    x.weights = ffn_skeleton(r, shared[s], sw);
    if (r.get<bool>(shared[s], "sigmoid_gate", sw)) x.gate.resize(1);
    m.shared.push_back(std::move(x));
  }
  l.ffn = std::move(m);
  return l;
}

/// Renames the complete directory `staged` to `dir`. Without `overwrite`, a
/// `dir` that appeared since the caller checked is an io_error and stays as
/// it is (rename does not replace a directory that holds anything). With it,
/// an existing `dir` is replaced only then, and survives if the rename
/// fails: swapped with the staged one in one step where the kernel can
/// (renameat2), so no crash leaves the path empty.
inline void move_into_place(const std::filesystem::path& staged, const std::filesystem::path& dir, bool overwrite) {
  std::error_code ec;
  const auto failed = [&](const std::error_code& why) {
    return io_error(cat("native: cannot rename '", staged.string(), "' to '", dir.string(), "': ", why.message()));
  };
  if (!overwrite || !std::filesystem::exists(std::filesystem::symlink_status(dir))) {
    std::filesystem::rename(staged, dir, ec);
    if (ec && !overwrite && std::filesystem::exists(std::filesystem::symlink_status(dir)))
      throw io_error(cat("native: output '", dir.string(), "' appeared while it was being written; it was left as it was"));
    if (ec) throw failed(ec);
    return;
  }
#if defined(RENAME_EXCHANGE)
  if (::renameat2(AT_FDCWD, staged.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) == 0) {
    std::filesystem::remove_all(staged, ec);  // now the old directory
    return;
  }
  if (errno != EINVAL && errno != ENOSYS) throw failed(std::error_code(errno, std::generic_category()));
#endif
  // No exchange on this file system: move the old one aside first.
  const auto old = dir.parent_path() / cat(".", dir.filename().string(), ".old.", ::getpid());
  std::filesystem::rename(dir, old, ec);
  if (ec) throw io_error(cat("native: cannot move '", dir.string(), "' aside: ", ec.message()));
  std::filesystem::rename(staged, dir, ec);
  if (ec) {
    std::error_code ignored;
    std::filesystem::rename(old, dir, ignored);
    throw failed(ec);
  }
  std::filesystem::remove_all(old, ec);
}

/// A new sibling of `dir` for building the output in (`.NAME.tmp.PID`,
/// locked while it lives); removed unless committed. Those that killed runs
/// left for the same output are removed first (remove_abandoned).
class staging_dir {
 public:
  explicit staging_dir(const std::filesystem::path& dir)
      : path_(dir.parent_path() / cat(".", dir.filename().string(), ".tmp.", ::getpid())) {
    std::error_code ec;
    std::filesystem::create_directories(dir.parent_path(), ec);
    if (ec) throw io_error(cat("native: cannot create '", dir.parent_path().string(), "': ", ec.message()));
    moeforge::detail::remove_abandoned(dir.parent_path(), cat(".", dir.filename().string(), ".tmp."), std::filesystem::file_type::directory);
    std::filesystem::remove_all(path_, ec);
    if (!std::filesystem::create_directory(path_, ec))
      throw io_error(cat("native: cannot create '", path_.string(), "': ", ec.message()));
    lock_ = moeforge::detail::held_lock(path_);
  }
  staging_dir(const staging_dir&) = delete;
  staging_dir& operator=(const staging_dir&) = delete;
  ~staging_dir() {
    std::error_code ec;
    if (!committed_) std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }

  /// Moves the staged directory to `dir` (see move_into_place).
  void commit(const std::filesystem::path& dir, bool overwrite) {
    move_into_place(path_, dir, overwrite);
    committed_ = true;
  }

 private:
  std::filesystem::path path_;
  moeforge::detail::held_lock lock_;
  bool committed_ = false;
};

/// Writes moeforge.json into a directory being built and copies the attachments beside it.
/// `extra` adds top-level keys (a packed model's "panels").
inline void write_manifest(const std::filesystem::path& dir, const model::config& c, nlohmann::json layers, const nlohmann::json& provenance,
                           const std::vector<std::pair<std::string, std::string>>& attachments,
                           const nlohmann::json& extra = nlohmann::json::object()) {
  nlohmann::json manifest{{"format", "moeforge"},
                          {"version", native_version},
                          {"config", config_json(c)},
                          {"layers", std::move(layers)},
                          {"provenance", provenance}};
  manifest.update(extra);
  {
    std::ofstream f(dir / native_manifest);
    f << moeforge::detail::json_text(manifest, 2) << "\n";
    if (!f.flush()) throw io_error(cat("native: cannot write '", (dir / native_manifest).string(), "'"));
  }
  for (const auto& [source, name] : attachments) {
    std::error_code ec;
    // Over a copy an interrupted streamed conversion made (see stream.hpp):
    // removed first, as copy_file gives a copy its source's permissions
    // before writing it, and a read-only one is not opened again for writing.
    std::filesystem::remove(dir / name, ec);
    std::filesystem::copy_file(source, dir / name, std::filesystem::copy_options::overwrite_existing, ec);
    if (ec) throw io_error(cat("native: cannot copy '", source, "' into the model: ", ec.message()));
  }
}

}  // namespace detail

inline constexpr const char* native_index = "model.safetensors.index.json";

/// Writes a native model's tensors tensor by tensor into shards of at most
/// `shard_bytes` (a tensor bigger than that gets a shard of its own), inside a
/// directory being built (a staging directory), so a model bigger than memory
/// can be written as it is produced. state() records what is on disk, so a
/// killed run can continue with resume(); finish() names the shards
/// model-0000k-of-0000N.safetensors beside their index (one shard is plain
/// model.safetensors, which every moeforge reads).
class native_shard_writer {
 public:
  native_shard_writer(std::filesystem::path dir, std::uint64_t shard_bytes) : dir_(std::move(dir)), shard_bytes_(shard_bytes) {
    if (shard_bytes_ < 1) throw config_error("native: the shard size must be at least 1 byte");
  }

  /// Continues from a state() an interrupted writer recorded.
  static native_shard_writer resume(std::filesystem::path dir, std::uint64_t shard_bytes, const nlohmann::json& state) {
    return restore(std::move(dir), shard_bytes, state, false);
  }

  /// Appends a tensor stored as `stored` (F32, or F16/BF16 rounded to nearest even).
  void add(const std::string& name, const std::vector<std::int64_t>& shape, const float* data, io::dtype stored) {
    std::uint64_t bytes = dtype_size(stored);
    for (auto d : shape) bytes *= std::uint64_t(std::max<std::int64_t>(d, 0));
    if (open_ && !open_->tensors().empty() && (open_->file_bytes() + bytes > shard_bytes_ || !open_->fits(name, shape, stored))) {
      open_->finish();
      closed_.push_back(open_->tensors());
      open_.reset();
    }
    if (!open_) open_.emplace(part(closed_.size()).string(), reserve(), metadata());
    open_->add(name, shape, data, stored);
  }

  /// Finishes what an interrupted writer recorded in `state` (see finish()),
  /// wherever it stopped: shards already renamed to their final names are
  /// left so, the open one gets its header, the index is written again.
  static void complete(std::filesystem::path dir, std::uint64_t shard_bytes, const nlohmann::json& state) {
    restore(std::move(dir), shard_bytes, state, true).finish();
  }

  /// What is written so far, as JSON (see resume()).
  nlohmann::json state() const {
    nlohmann::json closed = nlohmann::json::array();
    for (const auto& c : closed_) closed.push_back(json_of(c));
    return {{"closed", closed}, {"open", open_ ? json_of(open_->tensors()) : nlohmann::json()}};
  }

  /// Closes the last shard and gives the shards their final names (and an index when there are several).
  void finish() {
    using detail::cat;
    if (open_) {
      open_->finish();
      closed_.push_back(open_->tensors());
      open_.reset();
    }
    const std::size_t n = closed_.size();
    nlohmann::json map = nlohmann::json::object();
    std::uint64_t total = 0;
    for (std::size_t k = 0; k < n; ++k) {
      char name[64];
      std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", k + 1, n);
      const std::string final_name = n == 1 ? std::string(native_tensors) : std::string(name);
      std::error_code ec;
      // (Unless an interrupted finish() renamed it already: see complete().)
      if (std::filesystem::exists(part(k)) || !std::filesystem::exists(dir_ / final_name)) std::filesystem::rename(part(k), dir_ / final_name, ec);
      if (ec) throw io_error(cat("native: cannot rename '", part(k).string(), "': ", ec.message()));
      for (const auto& t : closed_[k]) {
        map[t.name] = final_name;
        total += t.end - t.begin;
      }
    }
    if (n > 1) {
      const auto index = dir_ / native_index, staged = dir_ / (std::string(native_index) + ".tmp");
      {
        std::ofstream f(staged);
        f << moeforge::detail::json_text({{"metadata", {{"total_size", total}}}, {"weight_map", map}}, 2) << "\n";
        if (!f.flush()) throw io_error(cat("native: cannot write '", staged.string(), "'"));
      }
      std::error_code ec;
      std::filesystem::rename(staged, index, ec);
      if (ec) throw io_error(cat("native: cannot rename '", staged.string(), "': ", ec.message()));
    }
  }

 private:
  /// The writer `state` describes. With `finishing`, an open shard whose
  /// interim file is gone was finished and renamed already: it counts as closed.
  static native_shard_writer restore(std::filesystem::path dir, std::uint64_t shard_bytes, const nlohmann::json& state, bool finishing) {
    native_shard_writer w(std::move(dir), shard_bytes);
    try {
      for (const auto& c : state.at("closed")) w.closed_.push_back(tensors_of(c));
      const auto& open = state.at("open");
      if (finishing && !open.is_null() && !std::filesystem::exists(w.part(w.closed_.size())))
        w.closed_.push_back(tensors_of(open));
      else if (!open.is_null())
        w.open_.emplace(safetensors_writer::resume(w.part(w.closed_.size()).string(), w.reserve(), tensors_of(open), metadata()));
    } catch (const nlohmann::json::exception& e) {
      throw format_error(detail::cat("native: the recorded shard state in '", w.dir_.string(), "' is damaged (", moeforge::detail::reason(e), ")"));
    }
    return w;
  }

  std::filesystem::path part(std::size_t k) const { return dir_ / detail::cat("shard-", k + 1, ".part"); }
  // Room for the header: ~100 bytes a tensor, so shards of big tensors need
  // little and small test shards do not carry a megabyte of spaces.
  std::size_t reserve() const { return std::size_t(std::clamp<std::uint64_t>(shard_bytes_ / 1024, 4096, 1 << 20)); }
  static std::map<std::string, std::string> metadata() { return {{"format", "pt"}, {"producer", "moeforge"}}; }

  static nlohmann::json json_of(const std::vector<tensor_info>& ts) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& t : ts) out.push_back({t.name, std::string(dtype_name(t.dtype)), t.shape, t.begin, t.end});
    return out;
  }
  static std::vector<tensor_info> tensors_of(const nlohmann::json& j) {
    std::vector<tensor_info> out;
    for (const auto& e : j)
      out.push_back({e.at(0).get<std::string>(), detail::parse_dtype(e.at(1).get<std::string>(), "native shard state"),
                     e.at(2).get<std::vector<std::int64_t>>(), e.at(3).get<std::size_t>(), e.at(4).get<std::size_t>()});
    return out;
  }

  std::filesystem::path dir_;
  std::uint64_t shard_bytes_;
  std::vector<std::vector<tensor_info>> closed_;
  std::optional<safetensors_writer> open_;
};

/// `dir` as the absolute, normalised path of the directory it names ("out/m/"
/// names "out/m"). An empty path is refused.
inline std::filesystem::path output_path(const std::string& dir) {
  if (dir.empty()) throw io_error("output: the path is empty");
  std::filesystem::path p = std::filesystem::absolute(std::filesystem::path(dir)).lexically_normal();
  return p.has_filename() ? p : p.parent_path();
}

/// Refuses to go on when `dir` exists and may not be replaced, or cannot be
/// created. Conversions call this before doing any work, so the user learns it
/// at once. Symbolic links count as what they are, dangling ones included.
inline void check_output_dir(const std::string& dir, bool overwrite) {
  namespace fs = std::filesystem;
  const fs::path p = output_path(dir);
  const bool exists = fs::exists(fs::symlink_status(p));
  if (exists && !overwrite) throw io_error(detail::cat("output '", dir, "' already exists; choose another path or allow overwriting"));
  if (exists && !fs::is_directory(p)) throw io_error(detail::cat("output '", dir, "' exists and is not a directory"));
  // Missing parents are created when the model is written (like mkdir -p);
  // what must hold now is that the nearest existing ancestor is a directory.
  fs::path ancestor = p.parent_path();
  while (!fs::exists(fs::symlink_status(ancestor)) && ancestor.has_relative_path()) ancestor = ancestor.parent_path();
  if (!fs::is_directory(ancestor))
    throw io_error(detail::cat("output '", dir, "': '", ancestor.string(), "' is not a directory"));
}

/// Writes `w` as a native model directory `dir`, atomically: everything is
/// staged in a sibling directory and renamed into place once complete.
inline void save_native(const model::weights& w, const std::string& dir, const nlohmann::json& provenance = nlohmann::json::object(),
                        const native_save_options& opt = {}) {
  namespace fs = std::filesystem;
  model::validate(w);
  const fs::path out = output_path(dir);
  check_output_dir(out.string(), opt.overwrite);

  nlohmann::json layers = nlohmann::json::array();
  for (const auto& l : w.layers) layers.push_back(detail::layer_json(l));

  const std::vector<tensor_view> views = detail::tensor_views(w, opt.stored, opt.as_source);

  detail::staging_dir stage(out);
  write_safetensors((stage.path() / native_tensors).string(), views, {{"format", "pt"}, {"producer", "moeforge"}});
  detail::write_manifest(stage.path(), w.config, std::move(layers), provenance, opt.attachments);
  stage.commit(out, opt.overwrite);
}

/// A JSON file, parsed: io_error when it cannot be opened, format_error when
/// it is not JSON, each naming `who` (the reader) and the file.
inline nlohmann::json read_json_file(const std::string& file, const std::string& who) {
  std::ifstream in(file);
  if (!in) throw io_error(detail::cat(who, ": cannot open '", file, "'"));
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw format_error(detail::cat(who, ": '", file, "' is not valid JSON (", moeforge::detail::reason(e), ")"));
  }
}

/// The parsed moeforge.json of a native directory (its provenance, for reports).
inline nlohmann::json read_native_manifest(const std::string& dir) {
  return read_json_file((std::filesystem::path(dir) / native_manifest).string(), "native");
}

/// How a packed model directory (io/packed.hpp) stores a weight matrix: its
/// rows × depth values as the kernel's panels of `nr` rows (see
/// runtime::detail::panel_matrix), restarting at `cuts`; the tensor holds
/// [panels(nr), depth, nr] values, F32 or BF16.
struct panel_layout {
  index_t rows = 0, depth = 0;
  std::vector<index_t> cuts;

  /// Calls segment(start, end, first_panel) for the rows between the cuts,
  /// in order, with the first of the `nr`-row panels each starts; returns
  /// the panels they take in all.
  template <class Segment>
  index_t for_each_segment(index_t nr, Segment&& segment) const {
    index_t panel = 0, start = 0;
    for (std::size_t s = 0; s <= cuts.size(); ++s) {
      const index_t end = s < cuts.size() ? cuts[s] : rows;
      segment(start, end, panel);
      panel += (end - start + nr - 1) / nr;
      start = end;
    }
    return panel;
  }
  index_t panels(index_t nr) const {
    return for_each_segment(nr, [](index_t, index_t, index_t) {});
  }
};

namespace detail {

/// Panels written with width `nr` (this build's or another's) as a row-major
/// rows × depth matrix.
inline void unpack_panels(const char* bytes, dtype type, index_t nr, const panel_layout& l, float* out) {
  l.for_each_segment(nr, [&](index_t start, index_t end, index_t panel) {
#pragma omp parallel for schedule(static)
    for (index_t r = start; r < end; ++r) {
      const index_t p = panel + (r - start) / nr, q = (r - start) % nr;
      const std::size_t base = std::size_t(p * l.depth) * std::size_t(nr), stride = std::size_t(nr);
      float* row = out + std::size_t(r) * std::size_t(l.depth);
      // memcpy per value: panels another writer left misaligned are read
      // here (only aligned ones are mapped).
      if (type == dtype::f32) {
        const char* v = bytes + 4 * (base + std::size_t(q));
        for (index_t k = 0; k < l.depth; ++k) std::memcpy(row + k, v + 4 * stride * std::size_t(k), 4);
      } else {
        const char* v = bytes + 2 * (base + std::size_t(runtime::detail::bf16_slot(q, nr)));
        for (index_t k = 0; k < l.depth; ++k) {
          std::uint16_t h;
          std::memcpy(&h, v + 2 * stride * std::size_t(k), 2);
          row[k] = bf16_to_f32(h);
        }
      }
    }
  });
}

/// Calls on_ffn(prefix, f, packed) for every FFN of `structure` that has
/// panels (a dense layer's, each routed expert but novices, each shared
/// expert), with its native tensor-name prefix and its packed_ffn in `p`,
/// which must be sized for `structure` (panel_slots).
template <class Weights, class Packed, class OnFfn>
void for_each_ffn_slot(Weights& structure, Packed& p, OnFfn&& on_ffn) {
  for (std::size_t li = 0; li < structure.layers.size(); ++li) {
    const std::string pre = cat("layers.", li);
    auto& f = p.ffn[li];
    if (auto* d = std::get_if<ffn>(&structure.layers[li].ffn)) {
      on_ffn(pre + ".ffn", *d, f.shared[0]);
      continue;
    }
    auto& m = std::get<moe_layer>(structure.layers[li].ffn);
    for (std::size_t e = 0; e < m.experts.size(); ++e)
      if (!m.experts[e].is_novice()) on_ffn(cat(pre, ".moe.experts.", e), m.experts[e].weights, f.experts[e]);
    for (std::size_t s = 0; s < m.shared.size(); ++s) on_ffn(cat(pre, ".moe.shared.", s), m.shared[s].weights, f.shared[s]);
  }
}

/// Calls on_panel(name, panel) for each panel of a packed model's layers,
/// named as the native format names the matrix it holds. `p` must be sized
/// for `structure` (panel_slots).
template <class Packed, class OnPanel>
void for_each_layer_panel(const model::weights& structure, Packed& p, OnPanel&& on_panel) {
  for (std::size_t li = 0; li < structure.layers.size(); ++li) {
    const std::string pre = cat("layers.", li);
    auto& a = p.attention[li];
    on_panel(pre + ".wq", a.wq);
    on_panel(pre + ".wk", a.wk);
    on_panel(pre + ".wv", a.wv);
    on_panel(pre + ".wo", a.wo);
  }
  for_each_ffn_slot(structure, p, [&](const std::string& prefix, const ffn& f, auto& panels) {
    if (f.gated()) on_panel(prefix + ".gate", panels.gate);
    on_panel(prefix + ".up", panels.up);
    on_panel(prefix + ".down", panels.down);
  });
}

/// Panels sized for `structure`: every layer, expert and shared expert in
/// place with its activation, no values (what for_each_layer_panel walks).
inline model::packed_weights panel_slots(const model::weights& structure) {
  model::packed_weights p;
  p.attention.resize(structure.layers.size());
  p.ffn.resize(structure.layers.size());
  for (std::size_t li = 0; li < structure.layers.size(); ++li) {
    const auto* m = std::get_if<moe_layer>(&structure.layers[li].ffn);
    p.ffn[li].experts.resize(m ? m->experts.size() : 0);
    p.ffn[li].shared.resize(m ? m->shared.size() : 1);
  }
  for_each_ffn_slot(structure, p, [](const std::string&, const ffn& f, runtime::detail::packed_ffn& panels) { panels.act = f.act; });
  return p;
}

/// Whether every weight matrix the kernels read in `structure` (attention
/// projections, FFN and expert weights, by native name) is BF16 by `type_of`.
template <class TypeOf>
bool kernel_matrices_bf16(const model::weights& structure, TypeOf&& type_of) {
  auto slots = panel_slots(structure);
  bool all = !structure.layers.empty();
  for_each_layer_panel(structure, slots, [&](const std::string& name, const auto&) { all = all && type_of(name) == dtype::bf16; });
  return all;
}

}  // namespace detail

/// A native model directory opened for reading one layer at a time from its
/// memory-mapped tensors. Opening it reads the manifest and checks that every
/// tensor it implies is present with the right rank and that none is left
/// over (headers only); the tensors' values are read by globals() and layer().
class native_layers {
 public:
  explicit native_layers(const std::string& dir) : dir_(dir), manifest_(read_native_manifest(dir)), st_(dir) {
    using detail::cat;
    const auto file = (std::filesystem::path(dir) / native_manifest).string();
    const auto& j = manifest_;
    const detail::manifest_reader r(file);
    if (r.get<std::string>(j, "format", "manifest") != "moeforge") r.fail("format must be 'moeforge'");
    if (const int v = r.get<int>(j, "version", "manifest"); v != native_version)
      r.fail(cat("version ", v, " is not supported (this build reads version ", native_version, ")"));
    auto& w = skeleton_;
    w.config = detail::parse_config(r, r.at(j, "config", "manifest"));
    const auto& layers = r.array(j, "layers", "manifest");
    if (index_t(layers.size()) != w.config.n_layers)
      r.fail(cat("describes ", layers.size(), " layers, config.n_layers is ", w.config.n_layers));
    for (std::size_t i = 0; i < layers.size(); ++i) w.layers.push_back(detail::layer_skeleton(r, layers[i], cat("layers[", i, "]")));
    w.weight_dtype = st_.weight_dtype();
    w.file_dtype = st_.matrix_dtype();
    if (j.contains("panels"))
      read_panel_index(r, r.at(j, "panels", "manifest"));
    else if (w.weight_dtype != dtype::bf16 && detail::kernel_matrices_bf16(w, [&](const std::string& name) { return st_.info(name).dtype; }))
      w.default_run_dtype = dtype::bf16;  // see model::weights::default_run_dtype
    // Attention biases are optional; the file says whether they exist.
    for (std::size_t i = 0; i < w.layers.size(); ++i) {
      auto& l = w.layers[i];
      const std::string p = cat("layers.", i);
      for (auto [name, bias] : {std::pair{".bq", &l.bq}, std::pair{".bk", &l.bk}, std::pair{".bv", &l.bv}})
        if (st_.contains(p + name)) bias->resize(1);
      // So are a fitted router's bias and a quadratic router's projection (rank 0 without).
      if (auto* m = std::get_if<moe_layer>(&l.ffn)) {
        if (m->router.fitted() && st_.contains(p + ".moe.router.bias")) m->router.bias.resize(1);
        if (m->router.kind == router_kind::quadratic_topk && st_.contains(p + ".moe.router.projection")) m->router.projection.resize(1, 1);
      }
    }
    std::size_t seen = 0;
    detail::for_each_tensor(
        w, [&](const std::string& name, const matrix&) { seen += panels_.count(name) ? panels_checked(name) : rank_checked(name, 2); },
        [&](const std::string& name, const vector&) { seen += rank_checked(name, 1); });
    // A tied packed model's classifier has panels of its own when the embedding's are kept apart.
    if (w.config.tied_embeddings && panels_.count("lm_head")) seen += panels_checked("lm_head");
    const auto names = st_.names();
    if (seen != names.size()) {
      for (const auto& t : names) {
        bool expected = false;
        detail::for_each_tensor(
            w, [&](const std::string& n, const matrix&) { expected |= n == t; }, [&](const std::string& n, const vector&) { expected |= n == t; });
        expected |= panels_.count(t) != 0;
        if (!expected) throw format_error(cat(st_.file(t), ": unexpected tensor '", t, "' (not described by ", file, ")"));
      }
    }
  }

  const model::config& config() const { return skeleton_.config; }

  /// The model without its layers: config, embedding, final norm, classifier
  /// (F32), the stored weight type and a packed directory's panel type.
  model::weights globals() const {
    model::weights w;
    w.config = skeleton_.config;
    w.weight_dtype = skeleton_.weight_dtype;
    w.default_run_dtype = skeleton_.default_run_dtype;
    w.file_dtype = skeleton_.file_dtype;
    const auto read_tensor = [this, &w](const std::string& name, auto& t) {
      note_type(w.file_dtypes, name, name);
      read(name, t);
    };
    detail::for_each_global_tensor(w, read_tensor, read_tensor);
    try {
      model::validate_globals(w);
    } catch (const error& e) {
      throw format_error(detail::cat(dir_, ": ", moeforge::detail::reason(e)));
    }
    return w;
  }

  /// Routed experts of layer `li` (0 for a dense layer), from the manifest.
  index_t experts(index_t li) const {
    const auto* m = std::get_if<moe_layer>(&skeleton_.layers[std::size_t(li)].ffn);
    return m ? m->num_experts() : 0;
  }

  /// Layer `li` in F32, checked against the config; the routed experts
  /// `keep` refuses come back released (see expert_filter). With `unread`,
  /// the row-major matrices an owning transformer packs and frees come back
  /// unread, recorded there (see detail::unread_matrices): their storage holds
  /// unspecified values, and the file's are not scanned for NaN (as read ones
  /// are not).
  model::layer layer(index_t li, const expert_filter& keep = {}, moeforge::detail::matrix_pool* pool = nullptr,
                     detail::unread_matrices* unread = nullptr) const {
    using detail::cat;
    model::layer l = skeleton_.layers[std::size_t(li)];
    std::set<const matrix*> packed;
    if (unread) {
      for (const matrix* m : {&l.wq, &l.wk, &l.wv, &l.wo}) packed.insert(m);
      model::for_each_packed_ffn(l, [&](ffn& f) { packed.insert({&f.gate, &f.up, &f.down}); });
    }
    std::vector<std::pair<index_t, std::string>> skipped;  // the experts not read, with their tensor names' prefix
    auto* m = std::get_if<moe_layer>(&l.ffn);
    if (m && keep)
      for (index_t e = 0; e < m->num_experts(); ++e)
        if (!m->experts[std::size_t(e)].is_novice() && !keep(e)) skipped.emplace_back(e, cat("layers.", li, ".moe.experts.", e, "."));
    const auto read_tensor = [&](const std::string& name, auto& t) {
      for (const auto& skip : skipped)
        if (name.compare(0, skip.second.size(), skip.second) == 0) return;
      note_type(l.file_dtypes, detail::name_in_layer(name), name);
      if constexpr (std::is_same_v<std::decay_t<decltype(t)>, matrix>)
        if (packed.count(&t) && !panels(name)) {
          const auto& info = st_.info(name);
          t = moeforge::detail::new_matrix(pool, index_t(info.shape[0]), index_t(info.shape[1]));
          return unread->add(t, {st_.stored_bytes(name), info.dtype, index_t(info.shape[1]), {}}, name);
        }
      read(name, t, pool);
    };
    detail::for_each_layer_tensor(std::size_t(li), l, read_tensor, read_tensor);
    for (const auto& [e, prefix] : skipped) {
      auto& f = m->experts[std::size_t(e)].weights;
      const auto up = matrix_shape(prefix + "up");  // [I, H]
      if (f.gated()) require_matrix_shape(prefix + "gate", up);
      require_matrix_shape(prefix + "down", {up[1], up[0]});
      f.released = ffn_shape{index_t(up[1]), index_t(up[0]), f.gated()};
      f.gate = matrix();  // the skeleton's placeholder
    }
    try {
      model::validate(skeleton_.config, l, std::size_t(li), bool(keep));
    } catch (const error& e) {
      throw format_error(detail::cat(dir_, ": ", moeforge::detail::reason(e)));
    }
    return l;
  }

  /// See safetensors_checkpoint::release.
  void release() const { st_.release(); }

  /// How a tensor of a packed model directory is stored as panels; null for
  /// a row-major tensor.
  const panel_layout* panels(const std::string& name) const {
    const auto it = panels_.find(name);
    return it == panels_.end() ? nullptr : &it->second;
  }
  /// The panel width a packed directory was written with (0: not packed).
  index_t panel_width() const { return panel_nr_; }
  /// Whether a packed directory keeps the embedding's panels apart from the
  /// classifier's (`tok_emb` in the stored type, `lm_head` in the run type),
  /// as an owning transformer does unless it looks tokens up in its classifier.
  bool embedding_apart() const {
    return panel_nr_ && !model::classifier_embeds(skeleton_.config, skeleton_.run_dtype(), skeleton_.weight_dtype);
  }
  /// The model as the manifest describes it, without values.
  const model::weights& skeleton() const { return skeleton_; }
  const safetensors_checkpoint& tensors() const { return st_; }

  /// One tensor, F32, with the file's shape (a panel tensor unpacked).
  void read(const std::string& name, matrix& m, moeforge::detail::matrix_pool* pool = nullptr) const {
    if (const auto* l = panels(name)) {
      m = moeforge::detail::new_matrix(pool, l->rows, l->depth);
      detail::unpack_panels(st_.stored_bytes(name), st_.info(name).dtype, panel_nr_, *l, m.data());
      return moeforge::detail::require_finite(m, detail::cat(st_.file(name), ": tensor '", name, "'"));
    }
    const auto& s = st_.info(name).shape;
    m = st_.read_matrix(name, index_t(s[0]), index_t(s[1]), pool);
  }
  void read(const std::string& name, vector& v, moeforge::detail::matrix_pool* = nullptr) const {
    v = st_.read_vector(name, index_t(st_.info(name).shape[0]));
  }

 private:
  /// The manifest's "panels": {"nr", "type", "weight_dtype", "file_dtype",
  /// "tensors": {name: [rows, depth, [cuts]]}}, listing exactly the matrices
  /// the kernels read.
  void read_panel_index(const detail::manifest_reader& r, const nlohmann::json& j) {
    using detail::cat;
    panel_nr_ = r.get<index_t>(j, "nr", "panels");
    if (panel_nr_ < 8 || panel_nr_ > 256 || panel_nr_ % 8 != 0) r.fail(cat("panels.nr = ", panel_nr_, ", expected a multiple of 8 in [8, 256]"));
    const auto kernel_type = [&](const char* key) {
      const auto name = r.get<std::string>(j, key, "panels");
      if (name != dtype_name(dtype::f32) && name != dtype_name(dtype::bf16)) r.fail(cat("panels.", key, " = '", name, "', expected F32 or BF16"));
      return name == dtype_name(dtype::f32) ? dtype::f32 : dtype::bf16;
    };
    skeleton_.default_run_dtype = kernel_type("type");
    skeleton_.weight_dtype = kernel_type("weight_dtype");
    // The source's type, which the directory's own F32 tensors do not tell (absent before it was recorded).
    if (j.contains("file_dtype"))
      skeleton_.file_dtype = detail::parse_dtype(r.get<std::string>(j, "file_dtype", "panels"), cat(r.file(), ": panels.file_dtype"));
    const auto& tensors = r.at(j, "tensors", "panels");
    if (!tensors.is_object()) r.fail("panels.tensors must be an object");
    for (const auto& [name, v] : tensors.items()) {
      const std::string where = cat("panels.tensors['", name, "']");
      if (!v.is_array() || v.size() != 3) r.fail(where + " must be [rows, depth, [cuts]]");
      panel_layout l;
      try {
        l.rows = v[0].get<index_t>();
        l.depth = v[1].get<index_t>();
        l.cuts = v[2].get<std::vector<index_t>>();
      } catch (const nlohmann::json::exception&) {
        r.fail(where + " must be [rows, depth, [cuts]] of integers");
      }
      if (l.rows < 1 || l.depth < 1 || l.rows > (index_t(1) << 31) || l.depth > (index_t(1) << 31))
        r.fail(cat(where, ": rows ", l.rows, " and depth ", l.depth, " must be in [1, 2^31]"));
      for (std::size_t c = 0; c < l.cuts.size(); ++c)
        if (l.cuts[c] <= (c ? l.cuts[c - 1] : 0) || l.cuts[c] >= l.rows)
          r.fail(cat(where, ": cuts must rise strictly inside (0, ", l.rows, ")"));
      panels_.emplace(name, std::move(l));
    }
    std::set<std::string> kernel_matrices{"tok_emb"};
    if (embedding_apart()) kernel_matrices.insert("lm_head");
    auto slots = detail::panel_slots(skeleton_);
    detail::for_each_layer_panel(skeleton_, slots, [&](const std::string& name, const auto&) { kernel_matrices.insert(name); });
    for (const auto& [name, l] : panels_)
      if (!kernel_matrices.count(name)) r.fail(cat("panels.tensors lists '", name, "', which is not a weight matrix the kernels read"));
    for (const auto& name : kernel_matrices)
      if (!panels_.count(name)) r.fail(cat("panels.tensors: '", name, "' must be stored as panels in a packed directory"));
  }
  /// Records under `key` the type tensor `name` is stored in (see
  /// model::layer::file_dtypes), but not in a packed directory: it stores
  /// what is not panels in F32 whatever the model's type.
  void note_type(std::map<std::string, dtype>& into, const std::string& key, const std::string& name) const {
    if (!panel_nr_) into[key] = st_.info(name).dtype;
  }
  /// A matrix tensor's [rows, cols] (a panel tensor's by its layout); ranks
  /// were checked when the directory was opened.
  std::vector<std::int64_t> matrix_shape(const std::string& name) const {
    if (const auto* l = panels(name)) return {l->rows, l->depth};
    return st_.info(name).shape;
  }
  void require_matrix_shape(const std::string& name, const std::vector<std::int64_t>& expected) const {
    if (const auto shape = matrix_shape(name); shape != expected)
      throw shape_error(detail::cat(st_.file(name), ": tensor '", name, "' has shape ", detail::shape_text(shape), ", expected ",
                                    detail::shape_text(expected)));
  }
  /// A panel tensor's dtype and shape against its layout: the run type, or
  /// the stored type for an embedding kept apart.
  std::size_t panels_checked(const std::string& name) const {
    const auto& info = st_.info(name);
    const auto& l = panels_.at(name);
    const dtype want = name == "tok_emb" && embedding_apart() ? skeleton_.weight_dtype : skeleton_.run_dtype();
    if (info.dtype != want)
      throw format_error(detail::cat(st_.file(name), ": panel tensor '", name, "' is ", dtype_name(info.dtype), ", expected ", dtype_name(want)));
    st_.require_shape(name, {l.panels(panel_nr_), l.depth, panel_nr_});
    return 1;
  }

  std::size_t rank_checked(const std::string& name, std::size_t rank) const {
    const auto& info = st_.info(name);
    if (info.shape.size() != rank)
      throw shape_error(detail::cat(st_.file(name), ": tensor '", name, "' has ", info.shape.size(), " dimensions, expected ", rank));
    return 1;
  }
  std::string dir_;
  nlohmann::json manifest_;  ///< read before the tensors are mapped: a directory without one is refused for that
  safetensors_checkpoint st_;
  model::weights skeleton_;  ///< shapes-only: placeholders mark the optional tensors that exist
  std::map<std::string, panel_layout> panels_;  ///< a packed directory's panel tensors
  index_t panel_nr_ = 0;
};

/// Loads a native model directory. Every tensor must be present with exactly
/// the shape the description implies and no tensor may be left over; the
/// model is returned only when complete and valid.
inline model::weights load_native(const std::string& dir) {
  const native_layers src(dir);
  model::weights w = src.globals();
  for (index_t li = 0; li < w.config.n_layers; ++li) w.layers.push_back(src.layer(li));
  try {
    model::validate(w);
  } catch (const error& e) {
    throw format_error(detail::cat(dir, ": ", moeforge::detail::reason(e)));
  }
  return w;
}

}  // namespace moeforge::io
