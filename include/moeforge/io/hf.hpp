// Hugging Face checkpoints: config.json plus safetensors (one file, a sharded
// index, or a directory holding either) for LLaMA, Qwen2, Mixtral and
// Qwen2-MoE; and the export back to those layouts for models they can express.
//
// Loading is all-or-nothing: the config is checked first, then every tensor
// the config implies is read against the shape it implies, and a tensor the
// config does not explain is an error (the config contradicts the weights).
#pragma once

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <cmath>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/convert/partition.hpp"
#include "moeforge/io/expert_filter.hpp"
#include "moeforge/io/native.hpp"
#include "moeforge/io/safetensors.hpp"
#include "moeforge/model/transformer.hpp"

namespace moeforge::io {

/// The families moeforge reads: dense "llama" and "qwen2" (q/k/v biases),
/// MoE "mixtral" and "qwen2_moe".
inline bool is_hf_model_type(const std::string& t) {
  return t == "llama" || t == "qwen2" || t == "mixtral" || t == "qwen2_moe";
}

/// What config.json says, reduced to what moeforge runs.
struct hf_config {
  std::string model_type;
  model::config model;           ///< the transformer's shape (half-split RoPE)
  index_t intermediate = 0;      ///< dense FFN width (intermediate_size)
  bool qkv_bias = false;         ///< Qwen2 family: q/k/v projections carry biases
  index_t experts = 0;           ///< 0 for a dense family
  index_t top_k = 0;
  index_t expert_intermediate = 0;  ///< Mixtral: intermediate_size; Qwen2-MoE: moe_intermediate_size
  index_t shared_intermediate = 0;  ///< Qwen2-MoE shared expert; 0 = none
  bool norm_topk_prob = true;       ///< renormalise the top-k probabilities (Mixtral always does)
  index_t sparse_step = 1;          ///< Qwen2-MoE decoder_sparse_step
  std::vector<index_t> mlp_only_layers;

  /// Whether layer `l` holds an MoE block (the rule of Qwen2-MoE's decoder layer).
  bool is_moe_layer(index_t l) const {
    if (experts == 0) return false;
    if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), l) != mlp_only_layers.end()) return false;
    return (l + 1) % sparse_step == 0;
  }
};

namespace detail {

using moeforge::detail::cat;

// Typed access to config.json: every failure names the file and the key.
class config_reader {
 public:
  config_reader(const nlohmann::json& j, std::string file) : j_(j), file_(std::move(file)) {}

  [[noreturn]] void fail(const std::string& key, const std::string& expected) const {
    throw format_error(cat("hf config '", file_, "': '", key, "' ", expected));
  }
  bool has(const std::string& key) const { return j_.contains(key) && !j_.at(key).is_null(); }

  index_t count(const std::string& key, std::int64_t min, std::optional<std::int64_t> fallback = std::nullopt) const {
    if (!has(key)) {
      if (fallback) return *fallback;
      fail(key, "is missing");
    }
    const auto& v = j_.at(key);
    if (!v.is_number_integer() || v.get<std::int64_t>() < min || v.get<std::int64_t>() > (std::int64_t(1) << 31))
      fail(key, cat("= ", v.dump(), ", expected an integer >= ", min));
    return v.get<index_t>();
  }
  double number(const std::string& key, double fallback) const {
    if (!has(key)) return fallback;
    const auto& v = j_.at(key);
    if (!v.is_number() || !(v.get<double>() > 0) || !std::isfinite(v.get<double>())) fail(key, cat("= ", v.dump(), ", expected a positive number"));
    return v.get<double>();
  }
  bool flag(const std::string& key, bool fallback) const {
    if (!has(key)) return fallback;
    if (!j_.at(key).is_boolean()) fail(key, cat("= ", j_.at(key).dump(), ", expected true or false"));
    return j_.at(key).get<bool>();
  }
  std::string text(const std::string& key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    if (!j_.at(key).is_string()) fail(key, cat("= ", j_.at(key).dump(), ", expected a string"));
    return j_.at(key).get<std::string>();
  }
  // eos_token_id may be one id or a list (generation stops at the first).
  std::int32_t token(const std::string& key, std::int32_t fallback) const {
    if (!has(key)) return fallback;
    const auto& v = j_.at(key);
    const auto& first = v.is_array() && !v.empty() ? v.front() : v;
    if (!first.is_number_integer() || first.get<std::int64_t>() < 0 || first.get<std::int64_t>() > std::numeric_limits<std::int32_t>::max())
      fail(key, cat("= ", v.dump(), ", expected a token id"));
    return first.get<std::int32_t>();
  }
  std::vector<index_t> indices(const std::string& key) const {
    if (!has(key)) return {};
    const auto& v = j_.at(key);
    if (!v.is_array()) fail(key, cat("= ", v.dump(), ", expected a list of layer indices"));
    std::vector<index_t> out;
    for (const auto& e : v) {
      if (!e.is_number_integer() || e.get<std::int64_t>() < 0) fail(key, cat("= ", v.dump(), ", expected a list of layer indices"));
      out.push_back(e.get<index_t>());
    }
    return out;
  }

 private:
  const nlohmann::json& j_;
  std::string file_;
};

// Per-family defaults of transformers' configuration classes, used when a key is absent.
struct hf_defaults {
  double rope_theta, rms_norm_eps;
  std::int64_t max_positions;
};
inline hf_defaults defaults_of(const std::string& t) {
  if (t == "mixtral") return {1e6, 1e-5, 4096 * 32};
  if (t == "llama") return {1e4, 1e-6, 2048};
  return {1e4, 1e-6, 32768};  // qwen2, qwen2_moe
}

// RoPE's base: rope_theta, or the rope_parameters object transformers 5
// writes in its place (with rope_scaling's role too). Only plain RoPE over
// whole heads runs here, so another rope_type, or a partial_rotary_factor
// (which transformers reads in any family), is refused rather than ignored.
inline double rope_theta_of(const nlohmann::json& j, const config_reader& r, double fallback) {
  const auto whole_heads = [&](const std::string& key, const nlohmann::json& v) {
    if (!v.is_number() || v.get<double>() != 1.0)
      r.fail(key, cat("= ", v.dump(), "; rotating only part of each head is not supported"));
  };
  if (r.has("partial_rotary_factor")) whole_heads("partial_rotary_factor", j.at("partial_rotary_factor"));
  const double theta = r.number("rope_theta", fallback);
  if (!r.has("rope_parameters")) return theta;
  const auto& p = j.at("rope_parameters");
  if (!p.is_object()) r.fail("rope_parameters", cat("= ", p.dump(), ", expected an object"));
  std::optional<double> nested;
  for (const auto& [key, v] : p.items()) {
    if (v.is_null()) continue;
    if (key == "rope_type" || key == "type") {
      if (v != "default") r.fail("rope_parameters", cat("has ", key, " = ", v.dump(), "; only the default (unscaled) RoPE is supported"));
    } else if (key == "rope_theta") {
      if (!v.is_number() || !(v.get<double>() > 0) || !std::isfinite(v.get<double>()))
        r.fail("rope_parameters", cat("has rope_theta = ", v.dump(), ", expected a positive number"));
      nested = v.get<double>();
    } else if (key == "partial_rotary_factor") {
      whole_heads("rope_parameters.partial_rotary_factor", v);
    } else {
      r.fail("rope_parameters", cat("has '", key, "' = ", v.dump(), "; only rope_type 'default' with rope_theta is supported"));
    }
  }
  if (nested && r.has("rope_theta") && *nested != theta)
    r.fail("rope_theta", cat("= ", theta, " but rope_parameters has rope_theta = ", *nested, "; which one is meant is unknown"));
  return nested.value_or(theta);
}

// Refuses attention over a sliding window: moeforge attends to every earlier
// position. Mixtral applies sliding_window whenever it is set (Qwen2's needs
// use_sliding_window, refused by the caller), and layer_types can mark
// sliding layers in any family; a window no narrower than the context
// `positions` leaves nothing out.
inline void require_full_attention(const nlohmann::json& j, const config_reader& r, const std::string& type, index_t positions) {
  if (type == "mixtral" && r.has("sliding_window")) {
    const index_t window = r.count("sliding_window", 1);
    if (window < positions)
      r.fail("sliding_window", cat("= ", window, ", narrower than the context of ", positions, "; sliding-window attention is not supported"));
  }
  if (!r.has("layer_types")) return;
  const auto& types = j.at("layer_types");
  if (!types.is_array()) r.fail("layer_types", cat("= ", types.dump(), ", expected a list of attention types"));
  for (const auto& t : types)
    if (t != "full_attention") r.fail("layer_types", cat("names ", t.dump(), "; only full_attention is supported"));
}

}  // namespace detail

/// Parses a config.json already read as JSON; `file` names it in errors.
inline hf_config parse_hf_config(const nlohmann::json& j, const std::string& file) {
  using detail::cat;
  if (!j.is_object()) throw format_error(cat("hf config '", file, "': expected a JSON object"));
  const detail::config_reader r(j, file);
  hf_config h;
  h.model_type = r.text("model_type", "");
  if (!is_hf_model_type(h.model_type))
    r.fail("model_type", cat("= '", h.model_type, "', expected one of llama, qwen2, mixtral, qwen2_moe"));
  const auto d = detail::defaults_of(h.model_type);
  const std::string act = r.text("hidden_act", "silu");
  if (act != "silu") r.fail("hidden_act", cat("= '", act, "', expected 'silu' (the only activation these families use)"));
  if (r.has("rope_scaling")) r.fail("rope_scaling", "is set; scaled RoPE is not supported (remove it or use a model without it)");
  if (r.flag("use_sliding_window", false)) r.fail("use_sliding_window", "is true; sliding-window attention is not supported");
  if (h.model_type == "llama" && r.flag("attention_bias", false))
    r.fail("attention_bias", "is true; LLaMA attention biases (including o_proj's) are not supported");
  if (h.model_type == "llama" && r.flag("mlp_bias", false)) r.fail("mlp_bias", "is true; FFN biases are not supported");

  auto& c = h.model;
  c.arch = h.model_type;
  c.dim = r.count("hidden_size", 1);
  c.n_layers = r.count("num_hidden_layers", 1);
  c.n_heads = r.count("num_attention_heads", 1);
  c.n_kv_heads = r.count("num_key_value_heads", 1, c.n_heads);
  if (c.n_heads % c.n_kv_heads != 0)
    r.fail("num_key_value_heads", cat("= ", c.n_kv_heads, ", expected a divisor of num_attention_heads = ", c.n_heads));
  if (!r.has("head_dim") && c.dim % c.n_heads != 0)
    r.fail("hidden_size", cat("= ", c.dim, " is not a multiple of num_attention_heads = ", c.n_heads, " and head_dim is not given"));
  c.head_dim = r.count("head_dim", 2, c.dim / c.n_heads);
  if (c.head_dim % 2 != 0) r.fail("head_dim", cat("= ", c.head_dim, ", expected an even size for RoPE"));
  c.vocab_size = r.count("vocab_size", 1);
  c.seq_len = r.count("max_position_embeddings", 1, d.max_positions);
  c.norm_eps = float(r.number("rms_norm_eps", d.rms_norm_eps));
  c.rope_theta = float(detail::rope_theta_of(j, r, d.rope_theta));
  detail::require_full_attention(j, r, h.model_type, c.seq_len);
  c.rope = model::rope_style::half_split;
  c.tied_embeddings = r.flag("tie_word_embeddings", false);
  c.bos_token = r.token("bos_token_id", 1);
  c.eos_token = r.token("eos_token_id", 2);
  h.qkv_bias = h.model_type == "qwen2" || h.model_type == "qwen2_moe";

  if (h.model_type == "mixtral") {
    h.experts = r.count("num_local_experts", 1);
    h.top_k = r.count("num_experts_per_tok", 1);
    h.expert_intermediate = r.count("intermediate_size", 1);
    h.norm_topk_prob = true;
  } else if (h.model_type == "qwen2_moe") {
    h.experts = r.count("num_experts", 1);
    h.top_k = r.count("num_experts_per_tok", 1);
    h.expert_intermediate = r.count("moe_intermediate_size", 1);
    h.shared_intermediate = r.count("shared_expert_intermediate_size", 0, 0);
    h.norm_topk_prob = r.flag("norm_topk_prob", false);
    h.sparse_step = r.count("decoder_sparse_step", 1, 1);
    h.mlp_only_layers = r.indices("mlp_only_layers");
    for (index_t l : h.mlp_only_layers)
      if (l >= c.n_layers) r.fail("mlp_only_layers", cat("names layer ", l, ", but num_hidden_layers = ", c.n_layers));
  }
  if (h.experts > 0 && h.top_k > h.experts)
    r.fail("num_experts_per_tok", cat("= ", h.top_k, ", expected at most the ", h.experts, " experts"));
  // Dense layers exist in every family but Mixtral.
  bool any_dense = h.model_type != "mixtral";
  if (h.model_type == "qwen2_moe") {
    any_dense = false;
    for (index_t l = 0; l < c.n_layers; ++l) any_dense = any_dense || !h.is_moe_layer(l);
  }
  h.intermediate = any_dense ? r.count("intermediate_size", 1) : 0;
  return h;
}

/// Reads and parses a config.json file.
inline hf_config read_hf_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw io_error(detail::cat("hf config '", path, "' cannot be opened"));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw format_error(detail::cat("hf config '", path, "' is not valid JSON (", moeforge::detail::reason(e), ")"));
  }
  return parse_hf_config(j, path);
}

/// The shape of one Hugging Face MoE block, for reading it on its own (a
/// fixture, a single layer) or as part of a model.
struct hf_moe_spec {
  std::string family = "mixtral";  ///< "mixtral" (w1/w3/w2 names) or "qwen2_moe"
  index_t hidden = 0, experts = 0, top_k = 0, intermediate = 0;
  index_t shared_intermediate = 0;  ///< qwen2_moe: 0 = no shared expert
  bool norm_topk_prob = true;
};

namespace detail {

// How NaN/Inf errors name a tensor of a Hugging Face checkpoint.
inline std::string tensor_label(const std::string& name) { return "hf: tensor '" + name + "'"; }

// Reads tensors of one checkpoint against the shapes the config implies,
// rejects NaN/Inf (in a matrix recorded unread, when it is packed), and
// remembers which names were used. With `shapes_only` it reads no data: it
// checks names and shapes against the headers and returns empty tensors (how
// streaming conversion vets a whole model up front).
class tensor_reader {
 public:
  /// Matrices are read into storage from `pool` when given. With `unread`,
  /// the weight matrices the kernels read (weight(), cube_slice()) are not
  /// read but recorded there, their NaN/Inf check left to the packing.
  explicit tensor_reader(const safetensors_checkpoint& ck, moeforge::detail::matrix_pool* pool = nullptr, unread_matrices* unread = nullptr)
      : ck_(ck), pool_(pool), unread_(unread) {}
  /// A reader that checks names and shapes against the headers and reads nothing.
  static tensor_reader headers_only(const safetensors_checkpoint& ck) {
    tensor_reader t(ck);
    t.shapes_only_ = true;
    return t;
  }

  bool has(const std::string& name) const { return ck_.contains(name); }
  matrix mat(const std::string& name, index_t rows, index_t cols) {
    if (shapes_only_) return shape_checked<matrix>(name, {rows, cols});
    return checked(ck_.read_matrix(name, rows, cols, pool_), name);
  }
  /// A weight matrix the kernels read (attention projection, FFN or expert
  /// weight): mat(), or recorded unread (see tensor_reader()).
  matrix weight(const std::string& name, index_t rows, index_t cols) {
    if (shapes_only_ || !unread_) return kernel_read(name, mat(name, rows, cols));
    ck_.require_shape(name, {rows, cols});
    return kernel_read(name, unread(name, 0, rows, cols, tensor_label(name)));
  }
  vector vec(const std::string& name, index_t n) {
    if (shapes_only_) return shape_checked<vector>(name, {n});
    return checked(ck_.read_vector(name, n), name);
  }
  // Rows [row0, row0 + rows) of expert x's slice [b, c] of a packed 3-D
  // tensor [a, b, c] (all of it by default) as a matrix; empty when only
  // checking shapes.
  matrix cube_slice(const std::string& name, index_t a, index_t b, index_t c, index_t x, index_t row0 = 0, index_t rows = -1) {
    if (shapes_only_) return kernel_read(name, shape_checked<matrix>(name, {a, b, c}));
    ck_.require_shape(name, {a, b, c});
    if (rows < 0) rows = b;
    const std::size_t first = std::size_t(x * b + row0) * std::size_t(c);
    const std::string what = cat("safetensors: '", ck_.file(name), "': tensor '", name, "' expert ", x);
    if (unread_) return kernel_read(name, unread(name, first, rows, c, what));
    matrix m = moeforge::detail::new_matrix(pool_, rows, c);
    ck_.read_rows(name, first, std::size_t(rows * c), m.data());
    moeforge::detail::require_finite(m, what);
    read_as(m.data(), name);
    return kernel_read(name, std::move(m));
  }
  // An FFN whose tensors are only checked against the headers, never read: released, with their shape.
  ffn released_ffn(const std::vector<std::pair<std::string, std::vector<std::int64_t>>>& tensors, index_t h, index_t i) {
    for (const auto& [name, shape] : tensors) shape_checked<matrix>(name, shape);
    ffn f;
    f.released = ffn_shape{h, i, true};
    return f;
  }
  void skip(const std::string& name) { used_.insert(name); }

  /// `v` holds values copied out of tensor `name` (Qwen2-MoE's shared-expert
  /// gate, a [1, H] matrix in the file): it was stored as that tensor was.
  void copied_from(const vector& v, const std::string& name) { types_[v.data()] = ck_.info(name).dtype; }
  /// Records in `l` (layer `li`) the type the file stored each tensor in that
  /// this reader read into it (see model::layer::file_dtypes), then forgets
  /// where they were (storage freed later may be reused for other tensors).
  void record_file_dtypes(model::layer& l, index_t li) {
    const auto note = [&](const std::string& name, const auto& t) { note_type(l.file_dtypes, name_in_layer(name), t.data()); };
    for_each_layer_tensor(std::size_t(li), l, note, note);
    types_.clear();
  }
  /// The same for the tensors outside the layers.
  void record_file_dtypes(model::weights& w) {
    const auto note = [&](const std::string& name, const auto& t) { note_type(w.file_dtypes, name, t.data()); };
    for_each_global_tensor(w, note, note);
    types_.clear();
  }

  /// Whether every weight matrix the kernels read (weight(), cube_slice():
  /// attention projections, FFN and expert weights) that this reader met is
  /// stored in BF16, routers and the rest aside.
  bool kernel_weights_bf16() const { return kernel_types_ == std::set<dtype>{dtype::bf16}; }

  // Every tensor of the checkpoint must have been used.
  void require_all_used(const std::string& what) const {
    for (const auto& name : ck_.names())
      if (!used_.count(name))
        throw format_error(cat(what, ": tensor '", name, "' is not part of the model its config describes"));
  }

 private:
  template <class M>
  M checked(M m, const std::string& name) {
    moeforge::detail::require_finite(m, tensor_label(name));
    read_as(m.data(), name);
    return m;
  }
  // The tensor whose values are (or will be) at `data` was read from `name`.
  void read_as(const float* data, const std::string& name) {
    used_.insert(name);
    types_[data] = ck_.info(name).dtype;
  }
  // `m`, read from `name` as a weight matrix the kernels read (see kernel_weights_bf16).
  matrix kernel_read(const std::string& name, matrix m) {
    kernel_types_.insert(ck_.info(name).dtype);
    return m;
  }
  void note_type(std::map<std::string, dtype>& into, const std::string& key, const float* data) const {
    if (const auto it = types_.find(data); data && it != types_.end()) into[key] = it->second;
  }
  // rows × cols values of tensor `name` from element `first` on, recorded unread; errors name `what`.
  matrix unread(const std::string& name, std::size_t first, index_t rows, index_t cols, std::string what) {
    const auto type = ck_.info(name).dtype;
    matrix m = moeforge::detail::new_matrix(pool_, rows, cols);
    unread_->add(m, {ck_.stored_bytes(name) + first * dtype_size(type), type, cols, std::move(what)}, name);
    read_as(m.data(), name);
    return m;
  }
  template <class M>
  M shape_checked(const std::string& name, const std::vector<std::int64_t>& shape) {
    ck_.require_shape(name, shape);
    used_.insert(name);
    return M();
  }
  const safetensors_checkpoint& ck_;
  moeforge::detail::matrix_pool* pool_;
  unread_matrices* unread_;
  bool shapes_only_ = false;
  std::set<std::string> used_;
  std::map<const float*, dtype> types_;  ///< the file's type of each tensor read, by where its values are
  std::set<dtype> kernel_types_;         ///< the types of the weight matrices the kernels read
};

inline ffn read_ffn(tensor_reader& t, const std::string& gate, const std::string& up, const std::string& down, index_t h, index_t i) {
  ffn f;
  f.gate = t.weight(gate, i, h);
  f.up = t.weight(up, i, h);
  f.down = t.weight(down, h, i);
  return f;
}

// `keep`: see expert_filter; the experts it refuses are released, their data not read.
inline moe_layer read_moe_block(tensor_reader& t, const std::string& p, const hf_moe_spec& s, const expert_filter& keep = {}) {
  const index_t h = s.hidden, i = s.intermediate, e = s.experts;
  moe_layer m;
  m.router.kind = router_kind::softmax_topk;
  m.router.weight = t.mat(p + ".gate.weight", e, h);
  m.router.top_k = s.top_k;
  m.router.renormalize = s.norm_topk_prob;
  m.experts.resize(std::size_t(e));
  const std::string packed = p + ".experts.gate_up_proj";
  if (t.has(packed)) {
    if (t.has(p + ".experts.0." + (s.family == "mixtral" ? "w1" : "gate_proj") + ".weight"))
      throw format_error(cat("hf: block '", p, "' holds its experts both packed and per expert"));
    // gate_up_proj [E, 2I, H]: the gate's I rows first; down_proj [E, H, I].
    // Slice by slice, so a filtered read never touches the other experts'
    // bytes and the peak is one expert, not the whole packed tensor.
    const std::string down = p + ".experts.down_proj";
    for (index_t x = 0; x < e; ++x) {
      ffn& f = m.experts[std::size_t(x)].weights;
      if (keep && !keep(x)) {
        f = t.released_ffn({{packed, {e, 2 * i, h}}, {down, {e, h, i}}}, h, i);
        continue;
      }
      matrix gate = t.cube_slice(packed, e, 2 * i, h, x, 0, i), up = t.cube_slice(packed, e, 2 * i, h, x, i, i);
      matrix dn = t.cube_slice(down, e, h, i, x);
      if (dn.size() == 0) continue;  // only checking shapes
      f.gate = std::move(gate);
      f.up = std::move(up);
      f.down = std::move(dn);
    }
  } else {
    const bool mixtral = s.family == "mixtral";
    for (index_t x = 0; x < e; ++x) {
      const std::string q = cat(p, ".experts.", x, ".");
      const std::string gate = q + (mixtral ? "w1" : "gate_proj") + ".weight", up = q + (mixtral ? "w3" : "up_proj") + ".weight",
                        down = q + (mixtral ? "w2" : "down_proj") + ".weight";
      m.experts[std::size_t(x)].weights = keep && !keep(x) ? t.released_ffn({{gate, {i, h}}, {up, {i, h}}, {down, {h, i}}}, h, i)
                                                           : read_ffn(t, gate, up, down, h, i);
    }
  }
  if (s.shared_intermediate > 0) {
    const std::string q = p + ".shared_expert.";
    shared_expert sh{read_ffn(t, q + "gate_proj.weight", q + "up_proj.weight", q + "down_proj.weight", h, s.shared_intermediate), vector()};
    const matrix gate = t.mat(p + ".shared_expert_gate.weight", 1, h);  // 0×0 when only checking shapes
    if (gate.rows() == 1) {
      sh.gate = gate.row(0).transpose();
      t.copied_from(sh.gate, p + ".shared_expert_gate.weight");
    }
    m.shared.push_back(std::move(sh));
  }
  return m;
}

inline hf_moe_spec moe_spec_of(const hf_config& h) {
  return {h.model_type, h.model.dim, h.experts, h.top_k, h.expert_intermediate, h.shared_intermediate, h.norm_topk_prob};
}

// Layer `li` as config.json describes it (attention, norms, dense FFN or MoE block).
inline model::layer read_layer(tensor_reader& t, const hf_config& h, index_t li, const expert_filter& keep = {}) {
  const auto& c = h.model;
  const index_t dim = c.dim, q = c.n_heads * c.head_dim, kv = c.n_kv_heads * c.head_dim;
  model::layer l;
  const std::string p = cat("model.layers.", li, ".");
  l.attn_norm = t.vec(p + "input_layernorm.weight", dim);
  l.ffn_norm = t.vec(p + "post_attention_layernorm.weight", dim);
  l.wq = t.weight(p + "self_attn.q_proj.weight", q, dim);
  l.wk = t.weight(p + "self_attn.k_proj.weight", kv, dim);
  l.wv = t.weight(p + "self_attn.v_proj.weight", kv, dim);
  l.wo = t.weight(p + "self_attn.o_proj.weight", dim, q);
  if (h.qkv_bias) {
    l.bq = t.vec(p + "self_attn.q_proj.bias", q);
    l.bk = t.vec(p + "self_attn.k_proj.bias", kv);
    l.bv = t.vec(p + "self_attn.v_proj.bias", kv);
  }
  // Older exports keep RoPE's inverse frequencies as a buffer; they follow from the config.
  if (t.has(p + "self_attn.rotary_emb.inv_freq")) t.skip(p + "self_attn.rotary_emb.inv_freq");
  if (h.is_moe_layer(li)) {
    // transformers 5 names Mixtral's block "mlp", earlier versions "block_sparse_moe".
    const bool classic = h.model_type == "mixtral" && t.has(p + "block_sparse_moe.gate.weight");
    l.ffn = read_moe_block(t, p + (classic ? "block_sparse_moe" : "mlp"), moe_spec_of(h), keep);
  } else {
    l.ffn = read_ffn(t, p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight", dim, h.intermediate);
  }
  t.record_file_dtypes(l, li);
  return l;
}

// The config.json next to a weights path: the directory's own, or the file's sibling.
inline std::string sibling_config(const std::string& weights) {
  namespace fs = std::filesystem;
  const fs::path p(weights);
  return ((fs::is_directory(p) ? p : p.parent_path()) / "config.json").string();
}

}  // namespace detail

/// Reads one MoE block (router, experts per expert or packed, Qwen2-MoE's
/// shared expert and its sigmoid gate) stored under `prefix`, e.g.
/// "model.layers.0.mlp". Tensors outside the block are ignored.
inline moe_layer load_hf_moe_block(const safetensors_checkpoint& ck, const std::string& prefix, const hf_moe_spec& spec) {
  if (spec.family != "mixtral" && spec.family != "qwen2_moe")
    throw config_error(detail::cat("hf moe block: family '", spec.family, "', expected 'mixtral' or 'qwen2_moe'"));
  detail::tensor_reader t(ck);
  moe_layer m = detail::read_moe_block(t, prefix, spec);
  validate(m, prefix);
  return m;
}

namespace detail {

// The tensors outside the layers: embedding, final norm, classifier.
inline model::weights read_globals(tensor_reader& t, const hf_config& h) {
  const auto& c = h.model;
  model::weights w;
  w.config = c;
  w.tok_emb = t.mat("model.embed_tokens.weight", c.vocab_size, c.dim);
  w.final_norm = t.vec("model.norm.weight", c.dim);
  if (!c.tied_embeddings)
    w.lm_head = t.mat("lm_head.weight", c.vocab_size, c.dim);
  else if (t.has("lm_head.weight"))
    t.skip("lm_head.weight");  // some exporters store the tied copy too
  t.record_file_dtypes(w);
  return w;
}

// Every tensor config.json implies, in one walk (read, or only checked: see
// tensor_reader); a tensor left over is an error naming `what`.
inline model::weights read_model(tensor_reader& t, const hf_config& h, const std::string& what) {
  model::weights w = read_globals(t, h);
  for (index_t li = 0; li < h.model.n_layers; ++li) w.layers.push_back(read_layer(t, h, li));
  t.require_all_used(what);
  return w;
}

// The types a model read from `ck` was stored in and runs as (see
// model::weights); `kernel_bf16`: a reader's kernel_weights_bf16() over all of it.
inline void set_stored_types(model::weights& w, const safetensors_checkpoint& ck, bool kernel_bf16) {
  w.weight_dtype = ck.weight_dtype();
  w.file_dtype = ck.matrix_dtype();
  if (w.weight_dtype != dtype::bf16 && kernel_bf16) w.default_run_dtype = dtype::bf16;
}

inline std::string config_beside(const std::string& weights, const std::string& config) {
  const std::string path = config.empty() ? sibling_config(weights) : config;
  if (!std::filesystem::exists(path))
    throw io_error(cat("hf model '", weights, "': no config.json at '", path, "' (pass the config file explicitly)"));
  return path;
}

}  // namespace detail

/// Loads a Hugging Face model: `weights` is a directory (config.json plus
/// model.safetensors or model.safetensors.index.json), an index, or one
/// .safetensors file; `config` overrides where config.json is looked for.
inline model::weights load_hf(const std::string& weights, const std::string& config = "") {
  using detail::cat;
  const std::string config_path = detail::config_beside(weights, config);
  const hf_config h = read_hf_config(config_path);
  const safetensors_checkpoint ck(weights);
  detail::tensor_reader t(ck);
  model::weights w = detail::read_model(t, h, cat("hf model '", weights, "' (config '", config_path, "')"));
  detail::set_stored_types(w, ck, t.kernel_weights_bf16());
  try {
    model::validate(w);
  } catch (const error& e) {
    throw format_error(cat("hf model '", weights, "': ", moeforge::detail::reason(e)));
  }
  return w;
}

/// A Hugging Face checkpoint read one layer at a time from its memory-mapped
/// shards, for models bigger than memory. Opening it checks the config, every
/// shard's framing and every tensor's name and shape (headers only, no data
/// is read), so a damaged checkpoint is refused before any work starts.
class hf_layers {
 public:
  explicit hf_layers(const std::string& weights, const std::string& config = "")
      : config_path_(detail::config_beside(weights, config)), h_(read_hf_config(config_path_)), ck_(weights) {
    auto t = detail::tensor_reader::headers_only(ck_);
    detail::read_model(t, h_, detail::cat("hf model '", weights, "' (config '", config_path_, "')"));
    kernel_bf16_ = t.kernel_weights_bf16();
  }

  const hf_config& config() const { return h_; }
  const std::string& config_path() const { return config_path_; }
  const safetensors_checkpoint& checkpoint() const { return ck_; }

  /// The model without its layers: config, embedding, final norm and
  /// classifier in FP32 (NaN or Inf refused), and the stored weight type.
  model::weights globals() const {
    detail::tensor_reader t(ck_);
    model::weights w = detail::read_globals(t, h_);
    detail::set_stored_types(w, ck_, kernel_bf16_);
    return w;
  }

  /// Routed experts of layer `li` (0 for a dense layer), from config.json.
  index_t experts(index_t li) const { return h_.is_moe_layer(li) ? h_.experts : 0; }

  /// Layer `li` in FP32 (NaN or Inf refused, naming the tensor); the routed
  /// experts `keep` refuses come back released, their data not read (see
  /// expert_filter). With `unread`, the weight matrices the kernels read come
  /// back unread, recorded there (see detail::unread_matrices): their storage
  /// holds unspecified values, and NaN/Inf in the file's is refused when an
  /// owning transformer packs them.
  model::layer layer(index_t li, const expert_filter& keep = {}, moeforge::detail::matrix_pool* pool = nullptr,
                     detail::unread_matrices* unread = nullptr) const {
    detail::tensor_reader t(ck_, pool, unread);
    return detail::read_layer(t, h_, li, keep);
  }

  /// The embedding rows of `tokens` [n, H]; the rest of the table is not touched.
  matrix embed(const std::vector<std::int32_t>& tokens) const {
    const index_t dim = h_.model.dim;
    matrix x(index_t(tokens.size()), dim);
    for (std::size_t t = 0; t < tokens.size(); ++t) {
      const auto id = tokens[t];
      if (id < 0 || id >= h_.model.vocab_size)
        throw config_error(detail::cat("hf model: token ", id, " at ", t, " is outside the vocabulary of ", h_.model.vocab_size));
      ck_.read_rows("model.embed_tokens.weight", std::size_t(id) * std::size_t(dim), std::size_t(dim), x.row(index_t(t)).data());
    }
    moeforge::detail::require_finite(x, detail::tensor_label("model.embed_tokens.weight"));
    return x;
  }

  /// The dtype a tensor is stored in.
  io::dtype stored(const std::string& name) const { return ck_.info(name).dtype; }

  /// See safetensors_checkpoint::release.
  void release() const { ck_.release(); }

 private:
  std::string config_path_;
  hf_config h_;
  safetensors_checkpoint ck_;
  bool kernel_bf16_ = false;  ///< see tensor_reader::kernel_weights_bf16
};

/// Whether `dir` looks like a Hugging Face model directory.
inline bool is_hf_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  return fs::is_directory(dir) && fs::exists(fs::path(dir) / "config.json") &&
         (fs::exists(fs::path(dir) / "model.safetensors") || fs::exists(fs::path(dir) / "model.safetensors.index.json"));
}

namespace detail {

// llama2.c rotates pairs (2j, 2j+1) of each head, Hugging Face pairs (j, j + d/2):
// reorder each head's rows so that the half-split rotation sees the same pairs.
template <class M>
M to_half_split(const M& m, index_t heads, index_t head_dim) {
  M out(m.rows(), m.cols());
  const index_t half = head_dim / 2;
  for (index_t hd = 0; hd < heads; ++hd)
    for (index_t j = 0; j < half; ++j) {
      out.row(hd * head_dim + j) = m.row(hd * head_dim + 2 * j);
      out.row(hd * head_dim + half + j) = m.row(hd * head_dim + 2 * j + 1);
    }
  return out;
}

// Why `m` has no Hugging Face form, or "" when it has one (Mixtral without a
// shared expert, Qwen2-MoE with one sigmoid-gated shared expert).
inline std::string hf_unrepresentable(const moe_layer& m) {
  if (m.router.drop.active()) return cat("it has a ", drop_kind_name(m.router.drop.kind), " drop policy (DualSparse dropping)");
  if (m.router.kind != router_kind::softmax_topk)
    return cat("its router is ", router_kind_name(m.router.kind), " (only softmax_topk exists there)");
  if (m.router.scale != 1.0f) return "its router scale is not 1";
  if (m.compensation.active()) return "it has novice compensation (a per-token bias no Hugging Face MoE block has)";
  const index_t width = m.experts.front().width();
  for (const auto& e : m.experts) {
    if (e.is_novice()) return "it has novice experts";
    if (e.width() != width) return "its experts differ in width";
    if (!e.weights.gated() || e.weights.act != activation::silu) return "an expert is not a SiLU-gated FFN";
  }
  if (m.shared.size() > 1) return "it has more than one shared expert";
  if (m.shared.size() == 1) {
    const auto& s = m.shared.front();
    if (!s.gated()) return "its shared expert has no sigmoid gate (Qwen2-MoE's always has one)";
    if (!s.weights.gated() || s.weights.act != activation::silu) return "its shared expert is not a SiLU-gated FFN";
  } else if (!m.router.renormalize) {
    return "it renormalises no top-k probabilities and has no shared expert (Mixtral always renormalises)";
  }
  return "";
}

/// `w` with every partitioned MoE layer (DualSparse's partial transformation)
/// replaced by its complete transformation, a plain MoE of E·P experts; empty
/// when no layer is partitioned. Throws config_error when a layer's
/// sub-experts are not P even chunks of every expert.
inline std::optional<model::weights> with_complete_transformations(const model::weights& w) {
  std::optional<model::weights> out;
  for (std::size_t li = 0; li < w.layers.size(); ++li) {
    const auto* m = std::get_if<moe_layer>(&w.layers[li].ffn);
    if (!m || std::all_of(m->experts.begin(), m->experts.end(), [](const routed_expert& e) { return e.parts.empty(); })) continue;
    // Novices are never split (complete_transformation makes P of each); the
    // layer is refused for them, saying so, once it is complete.
    const auto split = std::find_if(m->experts.begin(), m->experts.end(), [](const routed_expert& e) { return !e.is_novice(); });
    const index_t parts = split == m->experts.end() ? 1 : split->sub_experts();
    for (const auto& e : m->experts)
      if (!e.is_novice() && (e.sub_experts() != parts || e.parts != convert::even_cuts(e.width(), parts)))
        throw config_error(cat("save_hf: layer ", li, " has no Hugging Face form: its experts' sub-experts are not ", parts,
                               " even chunks of each expert; save it in the native format"));
      else if (!e.is_novice() && e.width() % parts != 0)  // a Hugging Face MoE block's experts are all one width
        throw config_error(cat("save_hf: layer ", li, " has no Hugging Face form: its experts of ", e.width(), " neurons are split into ", parts,
                               " sub-experts of unequal widths (the partition must divide the width); save it in the native format"));
    if (!out) out = w;
    out->layers[li].ffn = convert::complete_transformation(*m, parts, cat("save_hf: layer ", li));
  }
  return out;
}

}  // namespace detail

/// How save_hf writes.
struct hf_save_options {
  /// Replace an existing directory (only once the new one is complete).
  bool overwrite = false;
  /// Store each tensor as the file the model was loaded from stored it
  /// (native_save_options::as_source, the same rule), so a checkpoint mixing
  /// types keeps each tensor's and reloads to run as it did.
  bool as_source = false;
};

/// Writes `w` as a Hugging Face directory (config.json + model.safetensors,
/// per-expert 2-D tensors; matrices in BF16 or F16 where save_native would
/// store them so, see detail::stored_matrix_dtype, or each as its source
/// stored it: hf_save_options), atomically. A
/// DualSparse-partitioned layer is written as its complete transformation
/// (E·P plain experts, same output). Dense models become "llama" (or
/// "qwen2" with attention biases); MoE models "mixtral" or "qwen2_moe". Models
/// those layouts cannot express (CMoE routers, novices, ...) are refused with
/// the reason; use save_native for them.
inline void save_hf(const model::weights& w, const std::string& dir, const hf_save_options& opt = {}) {
  namespace fs = std::filesystem;
  using detail::cat;
  model::validate(w);
  if (const auto flat = detail::with_complete_transformations(w)) return save_hf(*flat, dir, opt);
  const auto& c = w.config;
  const fs::path out = output_path(dir);
  check_output_dir(out.string(), opt.overwrite);

  const bool bias = w.layers.front().bq.size() != 0;
  const moe_layer* moe = nullptr;
  std::vector<index_t> dense_layers;
  index_t dense_width = 0;
  for (index_t li = 0; li < c.n_layers; ++li) {
    const auto& l = w.layers[std::size_t(li)];
    if ((l.bq.size() == 0) == bias || (l.bk.size() == 0) == bias || (l.bv.size() == 0) == bias)
      throw config_error(cat("save_hf: layer ", li, ": attention biases must be present in every layer or in none"));
    if (const auto* f = std::get_if<ffn>(&l.ffn)) {
      if (!f->gated() || f->act != activation::silu) throw config_error(cat("save_hf: layer ", li, ": FFN is not SiLU-gated"));
      if (dense_width && f->intermediate() != dense_width) throw config_error(cat("save_hf: layer ", li, ": dense FFN widths differ"));
      dense_width = f->intermediate();
      dense_layers.push_back(li);
      continue;
    }
    const auto& m = std::get<moe_layer>(l.ffn);
    if (const auto why = detail::hf_unrepresentable(m); !why.empty())
      throw config_error(cat("save_hf: layer ", li, " has no Hugging Face form: ", why, "; save it in the native format"));
    if (moe && (m.num_experts() != moe->num_experts() || m.router.top_k != moe->router.top_k ||
                m.experts.front().width() != moe->experts.front().width() || m.shared.size() != moe->shared.size() ||
                m.router.renormalize != moe->router.renormalize ||
                (!m.shared.empty() && m.shared.front().weights.intermediate() != moe->shared.front().weights.intermediate())))
      throw config_error(cat("save_hf: layer ", li, "'s MoE block differs in shape from layer 0's; Hugging Face configs describe one shape"));
    moe = &m;
  }
  std::string type = bias ? "qwen2" : "llama";
  if (moe) type = moe->shared.empty() && dense_layers.empty() && !bias ? "mixtral" : "qwen2_moe";
  if (type == "qwen2_moe" && moe->shared.empty())
    throw config_error("save_hf: an MoE model without a shared expert and with dense layers or attention biases has no Hugging Face form");

  // Each tensor's type as save_native would store it, found by where its
  // values are (a tensor whose layout differs is looked up by its original).
  std::map<const void*, dtype> types;
  for (const auto& v : detail::tensor_views(w, std::nullopt, opt.as_source)) types.emplace(v.data, v.stored);
  const auto type_of = [&](const auto& t) { return types.at(t.data()); };
  const dtype stored = type_of(w.layers.front().wq);
  nlohmann::json j{{"model_type", type},
                   {"hidden_size", c.dim},
                   {"num_hidden_layers", c.n_layers},
                   {"num_attention_heads", c.n_heads},
                   {"num_key_value_heads", c.n_kv_heads},
                   {"head_dim", c.head_dim},
                   {"vocab_size", c.vocab_size},
                   {"max_position_embeddings", c.seq_len},
                   {"rms_norm_eps", c.norm_eps},
                   {"rope_theta", c.rope_theta},
                   {"tie_word_embeddings", c.tied_embeddings},
                   {"bos_token_id", c.bos_token},
                   {"eos_token_id", c.eos_token},
                   {"hidden_act", "silu"},
                   {"torch_dtype", std::string(torch_dtype_name(stored))}};
  static const std::map<std::string, std::string> architecture{
      {"llama", "LlamaForCausalLM"}, {"qwen2", "Qwen2ForCausalLM"}, {"mixtral", "MixtralForCausalLM"}, {"qwen2_moe", "Qwen2MoeForCausalLM"}};
  j["architectures"] = {architecture.at(type)};
  if (dense_width) j["intermediate_size"] = dense_width;
  if (type == "mixtral") {
    j["num_local_experts"] = moe->num_experts();
    j["num_experts_per_tok"] = moe->router.top_k;
    j["intermediate_size"] = moe->experts.front().width();
  } else if (type == "qwen2_moe") {
    j["num_experts"] = moe->num_experts();
    j["num_experts_per_tok"] = moe->router.top_k;
    j["moe_intermediate_size"] = moe->experts.front().width();
    j["shared_expert_intermediate_size"] = moe->shared.front().weights.intermediate();
    j["norm_topk_prob"] = moe->router.renormalize;
    j["decoder_sparse_step"] = 1;
    j["mlp_only_layers"] = dense_layers;
    j["use_sliding_window"] = false;
    if (!dense_width) j["intermediate_size"] = moe->shared.front().weights.intermediate();
  }

  // Owned copies where the layout differs from ours (RoPE order, [1, H] gate rows).
  std::vector<matrix> owned_m;
  std::vector<vector> owned_v;
  owned_m.reserve(std::size_t(4 * c.n_layers));
  owned_v.reserve(std::size_t(3 * c.n_layers));
  const bool qwen = type == "qwen2" || type == "qwen2_moe";
  const bool permute = c.rope == model::rope_style::interleaved;
  std::vector<tensor_view> views;
  auto add_m = [&](const std::string& name, const matrix& m, const matrix* original = nullptr) {
    views.push_back({name, {m.rows(), m.cols()}, m.data(), type_of(original ? *original : m)});
  };
  // (A zero bias standing in for an absent one is F32.)
  auto add_v = [&](const std::string& name, const vector& v, const vector* original = nullptr) {
    views.push_back({name, {v.size()}, v.data(), original && original->size() == 0 ? dtype::f32 : type_of(original ? *original : v)});
  };
  auto add_ffn = [&](const std::string& p, const ffn& f, const char* g, const char* u, const char* d) {
    add_m(p + g, f.gate);
    add_m(p + u, f.up);
    add_m(p + d, f.down);
  };
  add_m("model.embed_tokens.weight", w.tok_emb);
  for (index_t li = 0; li < c.n_layers; ++li) {
    const auto& l = w.layers[std::size_t(li)];
    const std::string p = cat("model.layers.", li, ".");
    add_v(p + "input_layernorm.weight", l.attn_norm);
    add_v(p + "post_attention_layernorm.weight", l.ffn_norm);
    const matrix* wq = &l.wq;
    const matrix* wk = &l.wk;
    if (permute) {
      wq = &owned_m.emplace_back(detail::to_half_split(l.wq, c.n_heads, c.head_dim));
      wk = &owned_m.emplace_back(detail::to_half_split(l.wk, c.n_kv_heads, c.head_dim));
    }
    add_m(p + "self_attn.q_proj.weight", *wq, &l.wq);
    add_m(p + "self_attn.k_proj.weight", *wk, &l.wk);
    add_m(p + "self_attn.v_proj.weight", l.wv);
    add_m(p + "self_attn.o_proj.weight", l.wo);
    if (qwen) {  // the Qwen2 family always has q/k/v biases: zeros stand in for absent ones
      auto bias_of = [&](const vector& b, index_t heads, bool rotated) -> const vector& {
        if (b.size() == 0) return owned_v.emplace_back(vector::Zero(heads * c.head_dim));
        return permute && rotated ? owned_v.emplace_back(detail::to_half_split(b, heads, c.head_dim)) : b;
      };
      add_v(p + "self_attn.q_proj.bias", bias_of(l.bq, c.n_heads, true), &l.bq);
      add_v(p + "self_attn.k_proj.bias", bias_of(l.bk, c.n_kv_heads, true), &l.bk);
      add_v(p + "self_attn.v_proj.bias", bias_of(l.bv, c.n_kv_heads, false), &l.bv);
    }
    if (const auto* f = std::get_if<ffn>(&l.ffn)) {
      add_ffn(p + "mlp.", *f, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
      continue;
    }
    const auto& m = std::get<moe_layer>(l.ffn);
    const bool mixtral = type == "mixtral";
    const std::string b = p + (mixtral ? "block_sparse_moe." : "mlp.");
    add_m(b + "gate.weight", m.router.weight);
    for (index_t e = 0; e < m.num_experts(); ++e) {
      const std::string q = cat(b, "experts.", e, ".");
      const ffn& f = m.experts[std::size_t(e)].weights;
      if (mixtral)
        add_ffn(q, f, "w1.weight", "w3.weight", "w2.weight");
      else
        add_ffn(q, f, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
    }
    if (!m.shared.empty()) {
      add_ffn(b + "shared_expert.", m.shared.front().weights, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
      // A [1, H] matrix in the file: as its source stored it, else in the
      // matrices' type where that loses nothing, so the reloaded model's
      // matrices still share one (file_dtype).
      const vector& g = m.shared.front().gate;
      const dtype gate_type = opt.as_source                                  ? type_of(g)
                              : exact_in(stored, g.data(), std::size_t(g.size())) ? stored
                                                                                  : dtype::f32;
      views.push_back({b + "shared_expert_gate.weight", {1, g.size()}, g.data(), gate_type});
    }
  }
  add_v("model.norm.weight", w.final_norm);
  if (!c.tied_embeddings) add_m("lm_head.weight", w.lm_head);

  detail::staging_dir stage(out);
  write_safetensors((stage.path() / "model.safetensors").string(), views);
  {
    std::ofstream f(stage.path() / "config.json");
    f << moeforge::detail::json_text(j, 2) << "\n";
    if (!f.flush()) throw io_error(cat("save_hf: cannot write '", (stage.path() / "config.json").string(), "'"));
  }
  stage.commit(out, opt.overwrite);
}

}  // namespace moeforge::io
