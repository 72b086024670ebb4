// A small random Hugging Face checkpoint in several shards: the input of the
// streamed conversions, to the library (test_stream_convert) and to the
// command line (test_cli).
#pragma once

#include <filesystem>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "moeforge/io/hf.hpp"
#include "moeforge/io/native.hpp"
#include "moeforge/io/safetensors.hpp"
#include "support/random.hpp"
#include "support/temp_dir.hpp"
#include "support/util.hpp"

namespace moeforge::test {

/// What to break in a checkpoint.
struct hf_damage {
  std::string drop;       ///< a tensor left out
  std::string misshape;   ///< a tensor written with its dimensions swapped
};

/// The Hugging Face directory `single` (one model.safetensors) written again
/// as `out` in `shards` shards, tensors dealt round-robin so every layer is
/// spread over all of them, each in the type `type_of` names, with `d`'s damage.
inline std::string reshard(const std::string& single, const std::string& out, int shards, const std::function<dtype(const std::string&)>& type_of,
                           const hf_damage& d = {}) {
  const io::safetensors_file src(single + "/model.safetensors");
  std::filesystem::create_directories(out);
  std::filesystem::copy_file(single + "/config.json", out + "/config.json");
  std::vector<std::optional<io::safetensors_writer>> files(static_cast<std::size_t>(shards));
  nlohmann::json map = nlohmann::json::object();
  std::size_t i = 0;
  for (const auto& t : src.tensors()) {
    if (t.name == d.drop) continue;
    const std::size_t k = i++ % std::size_t(shards);
    const std::string file = "model-0000" + std::to_string(k + 1) + "-of-0000" + std::to_string(shards) + ".safetensors";
    if (!files[k]) files[k].emplace(out + "/" + file, 1 << 16);
    auto shape = t.shape;
    if (t.name == d.misshape) std::swap(shape.front(), shape.back());
    files[k]->add(t.name, shape, src.read(t.name).data(), type_of(t.name));
    map[t.name] = file;
  }
  for (auto& f : files) f->finish();
  write_json(out + "/model.safetensors.index.json", {{"weight_map", map}});
  return out;
}

/// A small random LLaMA model (`moe`: Mixtral, 4 experts of 24 neurons, top 2;
/// 3 layers, 32 wide, context 64, `vocab` tokens) written as a Hugging Face
/// directory of `shards` shards (see reshard), in `stored` but for the
/// tensors `in_f32` names (a checkpoint mixing types).
inline std::string sharded_hf(const temp_dir& dir, const std::string& name, dtype stored, int shards, const hf_damage& d = {}, bool moe = false,
                              index_t vocab = 64, const std::function<bool(const std::string&)>& in_f32 = {}) {
  std::mt19937 rng(11);
  model::weights w;
  auto& c = w.config;
  c.arch = "llama";
  c.dim = 32;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.vocab_size = vocab;
  c.seq_len = 64;
  c.rope = model::rope_style::half_split;
  c.tied_embeddings = false;
  w.tok_emb = random_matrix(c.vocab_size, c.dim, rng, 1.0f);
  w.lm_head = random_matrix(c.vocab_size, c.dim, rng);
  w.final_norm = vector::Ones(c.dim);
  for (index_t l = 0; l < c.n_layers; ++l) {
    model::layer x;
    x.attn_norm = vector::Ones(c.dim) + random_matrix(c.dim, 1, rng, 0.1f);
    x.ffn_norm = vector::Ones(c.dim) + random_matrix(c.dim, 1, rng, 0.1f);
    x.wq = random_matrix(c.n_heads * c.head_dim, c.dim, rng);
    x.wk = random_matrix(c.n_kv_heads * c.head_dim, c.dim, rng);
    x.wv = random_matrix(c.n_kv_heads * c.head_dim, c.dim, rng);
    x.wo = random_matrix(c.dim, c.n_heads * c.head_dim, rng);
    if (moe) {
      layer_spec spec;
      spec.hidden = c.dim;
      spec.widths = {24, 24, 24, 24};
      moe_layer m = random_layer(spec, rng);
      m.router.top_k = 2;
      m.router.renormalize = true;
      x.ffn = std::move(m);
    } else {
      x.ffn = random_ffn(c.dim, 48, rng);
    }
    w.layers.push_back(std::move(x));
  }
  const std::string single = dir / (name + ".single");
  io::save_hf(w, single);
  return reshard(single, dir / name, shards, [&](const std::string& t) { return in_f32 && in_f32(t) ? dtype::f32 : stored; }, d);
}

inline bool ends_with(const std::string& s, const std::string& end) {
  return s.size() >= end.size() && s.compare(s.size() - end.size(), end.size(), end) == 0;
}

/// Norms, Mixtral's routers and the classifier: the tensors some checkpoints
/// keep in F32 beside BF16 weights.
inline bool kept_in_f32(const std::string& hf_name) {
  return ends_with(hf_name, "norm.weight") || ends_with(hf_name, ".gate.weight") || hf_name == "lm_head.weight";
}

/// The native names of the norms and the classifier, which a source written
/// with kept_in_f32 stores in F32 (its routers too, where a conversion keeps them).
inline bool norm_or_head(const std::string& native_name) {
  return ends_with(native_name, "_norm") || native_name == "lm_head";
}

/// Every tensor of the native directory `dir` is stored in `stored`, but
/// those `in_f32` names (native names), in F32.
inline void check_stored_types(const std::string& dir, dtype stored, const std::function<bool(const std::string&)>& in_f32) {
  const io::safetensors_checkpoint ck(dir);
  for (const auto& name : ck.names()) {
    CAPTURE(dir, name);
    CHECK(dtype_name(ck.info(name).dtype) == dtype_name(in_f32(name) ? dtype::f32 : stored));
  }
}

/// Every tensor of a model, by native name, in the walk's order.
inline std::vector<std::pair<std::string, matrix>> named_tensors(const model::weights& w) {
  std::vector<std::pair<std::string, matrix>> out;
  io::detail::for_each_tensor(
      w, [&](const std::string& n, const matrix& m) { out.emplace_back(n, m); }, [&](const std::string& n, const vector& v) { out.emplace_back(n, matrix(v)); });
  return out;
}

}  // namespace moeforge::test
