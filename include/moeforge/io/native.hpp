// moeforge's native model format: a directory holding `model.safetensors`
// (every tensor, F32) and `moeforge.json` (the config, what each layer is, and
// where the model came from). It round-trips every model moeforge can build,
// including the CMoE analytic router and MoNE novices that have no Hugging
// Face equivalent.
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
// Tensor names (all F32, row-major, [out, in] like Hugging Face):
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

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

#include <nlohmann/json.hpp>

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
};

/// True when `dir` looks like a native model directory.
inline bool is_native_dir(const std::string& dir) {
  return std::filesystem::is_regular_file(std::filesystem::path(dir) / native_manifest);
}

namespace detail {

using moeforge::detail::cat;

/// Calls `on_matrix(name, m)` / `on_vector(name, v)` for every tensor slot of
/// `w` in one fixed order. Optional tensors (biases, lm_head when tied, a
/// dense FFN's gate when ungated) are visited only when the layer description
/// says they exist, so the same walk serves saving and loading.
template <class Weights, class OnMatrix, class OnVector>
void for_each_tensor(Weights& w, OnMatrix&& on_matrix, OnVector&& on_vector) {
  on_matrix("tok_emb", w.tok_emb);
  on_vector("final_norm", w.final_norm);
  if (!w.config.tied_embeddings) on_matrix("lm_head", w.lm_head);
  auto ffn_tensors = [&](const std::string& prefix, auto& f) {
    if (f.gated()) on_matrix(prefix + ".gate", f.gate);
    on_matrix(prefix + ".up", f.up);
    on_matrix(prefix + ".down", f.down);
  };
  for (std::size_t i = 0; i < w.layers.size(); ++i) {
    auto& l = w.layers[i];
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
      continue;
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
    try {
      return v.get<T>();
    } catch (const nlohmann::json::exception&) {
      throw format_error(cat(file_, ": ", where, ".", key, " = ", v.dump(), " has the wrong type"));
    }
  }
  const nlohmann::json& array(const nlohmann::json& obj, const std::string& key, const std::string& where) const {
    const auto& v = at(obj, key, where);
    if (!v.is_array()) throw format_error(cat(file_, ": ", where, ".", key, " must be an array"));
    return v;
  }
  [[noreturn]] void fail(const std::string& message) const { throw format_error(cat(file_, ": ", message)); }

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
    r.fail(cat(where, ": ", e.what()));
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
      r.fail(cat(dw, ": ", e.what()));
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

/// A new sibling of `dir` for building the output in; removed unless committed.
class staging_dir {
 public:
  explicit staging_dir(const std::filesystem::path& dir)
      : path_(dir.parent_path() / cat(".", dir.filename().string(), ".tmp.", ::getpid())) {
    std::error_code ec;
    std::filesystem::create_directories(dir.parent_path(), ec);
    if (ec) throw io_error(cat("native: cannot create '", dir.parent_path().string(), "': ", ec.message()));
    std::filesystem::remove_all(path_, ec);
    if (!std::filesystem::create_directory(path_, ec))
      throw io_error(cat("native: cannot create '", path_.string(), "': ", ec.message()));
  }
  staging_dir(const staging_dir&) = delete;
  staging_dir& operator=(const staging_dir&) = delete;
  ~staging_dir() {
    std::error_code ec;
    if (!committed_) std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }

  /// Moves the staged directory to `dir`; an existing `dir` is replaced only
  /// after the new one is complete, and survives if the rename fails.
  void commit(const std::filesystem::path& dir) {
    std::error_code ec;
    const auto old = dir.parent_path() / cat(".", dir.filename().string(), ".old.", ::getpid());
    const bool replacing = std::filesystem::exists(dir);
    if (replacing) {
      std::filesystem::rename(dir, old, ec);
      if (ec) throw io_error(cat("native: cannot move '", dir.string(), "' aside: ", ec.message()));
    }
    std::filesystem::rename(path_, dir, ec);
    if (ec) {
      std::error_code ignored;
      if (replacing) std::filesystem::rename(old, dir, ignored);
      throw io_error(cat("native: cannot rename '", path_.string(), "' to '", dir.string(), "': ", ec.message()));
    }
    committed_ = true;
    if (replacing) std::filesystem::remove_all(old, ec);
  }

 private:
  std::filesystem::path path_;
  bool committed_ = false;
};

}  // namespace detail

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
  const nlohmann::json manifest{{"format", "moeforge"},
                                {"version", native_version},
                                {"config", detail::config_json(w.config)},
                                {"layers", std::move(layers)},
                                {"provenance", provenance}};

  std::vector<tensor_view> views;
  detail::for_each_tensor(
      w, [&](const std::string& name, const matrix& m) { views.push_back({name, {m.rows(), m.cols()}, m.data()}); },
      [&](const std::string& name, const vector& v) { views.push_back({name, {v.size()}, v.data()}); });

  detail::staging_dir stage(out);
  write_safetensors((stage.path() / native_tensors).string(), views, {{"format", "pt"}, {"producer", "moeforge"}});
  {
    std::ofstream f(stage.path() / native_manifest);
    f << manifest.dump(2) << "\n";
    if (!f.flush()) throw io_error(detail::cat("native: cannot write '", (stage.path() / native_manifest).string(), "'"));
  }
  for (const auto& [source, name] : opt.attachments) {
    std::error_code ec;
    fs::copy_file(source, stage.path() / name, ec);
    if (ec) throw io_error(detail::cat("native: cannot copy '", source, "' into the model: ", ec.message()));
  }
  stage.commit(out);
}

/// The parsed moeforge.json of a native directory (its provenance, for reports).
inline nlohmann::json read_native_manifest(const std::string& dir) {
  const std::string file = (std::filesystem::path(dir) / native_manifest).string();
  std::ifstream in(file);
  if (!in) throw io_error(detail::cat("native: cannot open '", file, "'"));
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw format_error(detail::cat(file, ": not valid JSON (", e.what(), ")"));
  }
}

/// Loads a native model directory. Every tensor must be present with exactly
/// the shape the description implies and no tensor may be left over; the
/// model is returned only when complete and valid.
inline model::weights load_native(const std::string& dir) {
  using detail::cat;
  const auto file = (std::filesystem::path(dir) / native_manifest).string();
  const auto j = read_native_manifest(dir);
  const detail::manifest_reader r(file);
  if (r.get<std::string>(j, "format", "manifest") != "moeforge") r.fail("format must be 'moeforge'");
  if (const int v = r.get<int>(j, "version", "manifest"); v != native_version)
    r.fail(cat("version ", v, " is not supported (this build reads version ", native_version, ")"));

  model::weights w;
  w.config = detail::parse_config(r, r.at(j, "config", "manifest"));
  const auto& layers = r.array(j, "layers", "manifest");
  if (index_t(layers.size()) != w.config.n_layers)
    r.fail(cat("describes ", layers.size(), " layers, config.n_layers is ", w.config.n_layers));
  for (std::size_t i = 0; i < layers.size(); ++i) w.layers.push_back(detail::layer_skeleton(r, layers[i], cat("layers[", i, "]")));

  const safetensors_file st((std::filesystem::path(dir) / native_tensors).string());
  std::size_t seen = 0;
  auto shape_of = [&](const std::string& name, std::size_t rank) {
    const auto& info = st.at(name);
    if (info.shape.size() != rank)
      throw shape_error(cat(st.path(), ": tensor '", name, "' has ", info.shape.size(), " dimensions, expected ", rank));
    ++seen;
    return info.shape;
  };
  // Attention biases are optional; the file says whether they exist.
  for (std::size_t i = 0; i < w.layers.size(); ++i) {
    auto& l = w.layers[i];
    const std::string p = cat("layers.", i);
    for (auto [name, bias] : {std::pair{".bq", &l.bq}, std::pair{".bk", &l.bk}, std::pair{".bv", &l.bv}})
      if (st.find(p + name)) bias->resize(1);
    // So are a fitted router's bias and a quadratic router's projection (rank 0 without).
    if (auto* m = std::get_if<moe_layer>(&l.ffn)) {
      if (m->router.fitted() && st.find(p + ".moe.router.bias")) m->router.bias.resize(1);
      if (m->router.kind == router_kind::quadratic_topk && st.find(p + ".moe.router.projection")) m->router.projection.resize(1, 1);
    }
  }
  detail::for_each_tensor(
      w,
      [&](const std::string& name, matrix& m) {
        const auto s = shape_of(name, 2);
        m = st.read_matrix(name, index_t(s[0]), index_t(s[1]));
      },
      [&](const std::string& name, vector& v) {
        const auto s = shape_of(name, 1);
        v = st.read_vector(name, index_t(s[0]));
      });
  if (seen != st.tensors().size()) {
    for (const auto& t : st.tensors()) {
      bool expected = false;
      detail::for_each_tensor(
          w, [&](const std::string& n, const matrix&) { expected |= n == t.name; },
          [&](const std::string& n, const vector&) { expected |= n == t.name; });
      if (!expected) throw format_error(cat(st.path(), ": unexpected tensor '", t.name, "' (not described by ", file, ")"));
    }
  }
  try {
    model::validate(w);
  } catch (const error& e) {
    throw format_error(cat(dir, ": ", e.what()));
  }
  return w;
}

}  // namespace moeforge::io
