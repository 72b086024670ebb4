// Seeded random-weight models of published shapes, built in memory: what the
// whole-model benchmark runs when no checkpoint is given. The weights are
// random, so only speed (never quality) means anything on them.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/convert/cmoe.hpp"
#include "moeforge/io/native.hpp"
#include "moeforge/io/safetensors.hpp"
#include "moeforge/model/weights.hpp"

namespace moeforge::bench {

/// A LLaMA-architecture shape; experts > 0 makes every FFN an MoE of
/// `experts` experts of `intermediate` neurons, top-`top_k` (Mixtral).
struct model_shape {
  std::string name;
  index_t dim, layers, heads, kv_heads, vocab, intermediate;
  index_t experts = 0, top_k = 0;
};

inline const std::vector<model_shape>& model_shapes() {
  static const std::vector<model_shape> shapes{
      {"llama-7b", 4096, 32, 32, 32, 32000, 11008},
      {"mistral-7b", 4096, 32, 32, 8, 32000, 14336},
      // Mixtral's layer at a quarter of its width: hidden 2048, 8 experts of 5632, top 2.
      {"mixtral-mini", 2048, 32, 32, 8, 32000, 5632, 8, 2},
      {"tiny", 64, 2, 4, 2, 256, 176},
  };
  return shapes;
}

inline const model_shape& find_shape(const std::string& name) {
  std::string known;
  for (const auto& s : model_shapes()) {
    if (s.name == name) return s;
    known += (known.empty() ? "" : ", ") + s.name;
  }
  throw config_error("unknown model shape '" + name + "' (known: " + known + ")");
}

/// Fills m with values uniform in [-scale, scale) from a counter-based hash of
/// (seed, element): the same bytes for a given seed whatever the thread count,
/// and fast enough (one hash per value, all threads) for billions of weights.
inline void fill_random(float* data, std::size_t n, std::uint64_t seed, float scale) {
#pragma omp parallel for schedule(static)
  for (std::ptrdiff_t i = 0; i < std::ptrdiff_t(n); ++i) {
    std::uint64_t z = seed + 0x9E3779B97F4A7C15ull * std::uint64_t(i + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    data[i] = scale * (float(z >> 40) * (2.0f / 16777216.0f) - 1.0f);
  }
}

/// Builds seeded random tensors, each from its own stream.
class random_tensors {
 public:
  explicit random_tensors(std::uint64_t seed) : seed_(seed) {}
  matrix make(index_t rows, index_t cols) {
    matrix m(rows, cols);
    moeforge::detail::advise_huge_pages(m.data(), std::size_t(m.size()) * sizeof(float));  // as the loaders do
    // Uniform with the variance of N(0, 1/cols): activations keep their scale layer to layer.
    fill_random(m.data(), std::size_t(m.size()), next(), std::sqrt(3.0f / float(cols)));
    return m;
  }
  ffn make_ffn(index_t hidden, index_t neurons) {
    ffn f;
    f.gate = make(neurons, hidden);
    f.up = make(neurons, hidden);
    f.down = make(hidden, neurons);
    f.act = activation::silu;
    return f;
  }

 private:
  std::uint64_t next() { return seed_ * 0x2545F4914F6CDD1Dull + ++count_ * 0x9E3779B97F4A7C15ull; }
  std::uint64_t seed_, count_ = 0;
};

/// An MoE of `experts` routed experts of `width` neurons, top-k, plus `shared`
/// always-on experts of the same width, with a random softmax router whose
/// values are BF16 values, as a BF16 checkpoint's router is (the runtime
/// streams such a router in BF16: see runtime::detail::pack_router).
inline moe_layer random_moe(random_tensors& rnd, index_t hidden, index_t shared, index_t experts, index_t top_k, index_t width) {
  moe_layer m;
  m.router.kind = router_kind::softmax_topk;
  m.router.weight = rnd.make(experts, hidden).unaryExpr([](float v) { return bf16_to_f32(f32_to_bf16(v)); });
  m.router.top_k = top_k;
  m.router.renormalize = true;
  for (index_t e = 0; e < experts; ++e) m.experts.push_back({rnd.make_ffn(hidden, width), vector(), 0, {}});
  for (index_t s = 0; s < shared; ++s) m.shared.push_back({rnd.make_ffn(hidden, width), vector()});
  return m;
}

/// The CMoE layout "S{s}A{a}E{e}" of the dense shape `s`, parsed and checked
/// against its FFN width: what synthetic_model lays each FFN out as, for a
/// command to refuse a bad --moe before it builds anything.
inline convert::cmoe_config moe_layout(const model_shape& s, const std::string& moe) {
  if (s.experts) throw config_error("layout '" + moe + "': shape '" + s.name + "' is already an MoE");
  const convert::cmoe_config layout = convert::parse_cmoe_config(moe);
  convert::validate(layout, s.intermediate);
  return layout;
}

/// The shape's model with `layers` layers (≤ 0: the shape's own count). `moe`
/// empty keeps the shape's FFNs; "S{s}A{a}E{e}" lays each dense FFN out as
/// CMoE would (s shared and e − s routed experts of I/e neurons, top-a) with a
/// random partition, which is all a speed measurement needs.
inline model::weights synthetic_model(const model_shape& s, index_t layers, const std::string& moe, std::uint64_t seed,
                                      index_t context = 2048) {
  model::weights w;
  auto& c = w.config;
  c.arch = s.experts ? "mixtral" : "llama";
  c.dim = s.dim;
  c.n_layers = layers > 0 ? layers : s.layers;
  c.n_heads = s.heads;
  c.n_kv_heads = s.kv_heads;
  c.head_dim = s.dim / s.heads;
  c.vocab_size = s.vocab;
  c.seq_len = context;
  c.rope = model::rope_style::half_split;
  c.tied_embeddings = false;
  random_tensors rnd(seed);
  w.tok_emb = rnd.make(s.vocab, s.dim);
  w.lm_head = rnd.make(s.vocab, s.dim);
  w.final_norm = vector::Ones(s.dim);
  const index_t q = s.heads * c.head_dim, kv = s.kv_heads * c.head_dim;
  const convert::cmoe_config layout = moe.empty() ? convert::cmoe_config() : moe_layout(s, moe);
  for (index_t l = 0; l < c.n_layers; ++l) {
    model::layer L;
    L.attn_norm = vector::Ones(s.dim);
    L.ffn_norm = vector::Ones(s.dim);
    L.wq = rnd.make(q, s.dim);
    L.wk = rnd.make(kv, s.dim);
    L.wv = rnd.make(kv, s.dim);
    L.wo = rnd.make(s.dim, q);
    if (s.experts)
      L.ffn = random_moe(rnd, s.dim, 0, s.experts, s.top_k, s.intermediate);
    else if (!moe.empty())
      L.ffn = random_moe(rnd, s.dim, layout.shared, layout.experts - layout.shared, layout.active, s.intermediate / layout.experts);
    else
      L.ffn = rnd.make_ffn(s.dim, s.intermediate);
    w.layers.push_back(std::move(L));
  }
  return w;
}

/// One tensor of a synthetic Hugging Face checkpoint: drawn from the next
/// random stream ([rows, cols] scaled by cols, as random_tensors::make), or
/// ones (the norms).
struct hf_tensor_spec {
  std::string name;
  std::vector<std::int64_t> shape;
  bool random;
};

/// The shape's Hugging Face tensors in the order synthetic_model draws its
/// random streams, so a checkpoint written from this list loads as the same
/// weights as synthetic_model(s, layers, "", seed).
inline std::vector<hf_tensor_spec> hf_tensor_plan(const model_shape& s, index_t layers) {
  const index_t hd = s.dim / s.heads, q = s.heads * hd, kv = s.kv_heads * hd;
  std::vector<hf_tensor_spec> out{{"model.embed_tokens.weight", {s.vocab, s.dim}, true}, {"lm_head.weight", {s.vocab, s.dim}, true}};
  auto mat = [&](const std::string& name, index_t rows, index_t cols) { out.push_back({name, {rows, cols}, true}); };
  auto ffn3 = [&](const std::string& gate, const std::string& up, const std::string& down, index_t width) {
    mat(gate, width, s.dim);
    mat(up, width, s.dim);
    mat(down, s.dim, width);
  };
  for (index_t l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    out.push_back({p + "input_layernorm.weight", {s.dim}, false});
    out.push_back({p + "post_attention_layernorm.weight", {s.dim}, false});
    mat(p + "self_attn.q_proj.weight", q, s.dim);
    mat(p + "self_attn.k_proj.weight", kv, s.dim);
    mat(p + "self_attn.v_proj.weight", kv, s.dim);
    mat(p + "self_attn.o_proj.weight", s.dim, q);
    if (!s.experts) {
      ffn3(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight", s.intermediate);
      continue;
    }
    mat(p + "block_sparse_moe.gate.weight", s.experts, s.dim);
    for (index_t e = 0; e < s.experts; ++e) {
      const std::string x = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
      ffn3(x + "w1.weight", x + "w3.weight", x + "w2.weight", s.intermediate);
    }
  }
  out.push_back({"model.norm.weight", {s.dim}, false});
  return out;
}

/// config.json of the shape (LLaMA, or Mixtral when it has experts).
inline nlohmann::json hf_config_json(const model_shape& s, index_t layers, index_t context, dtype stored) {
  nlohmann::json j{{"model_type", s.experts ? "mixtral" : "llama"},
                   {"architectures", {s.experts ? "MixtralForCausalLM" : "LlamaForCausalLM"}},
                   {"hidden_size", s.dim},
                   {"intermediate_size", s.intermediate},
                   {"num_hidden_layers", layers},
                   {"num_attention_heads", s.heads},
                   {"num_key_value_heads", s.kv_heads},
                   {"vocab_size", s.vocab},
                   {"max_position_embeddings", context},
                   {"rms_norm_eps", 1e-5},
                   {"rope_theta", 10000.0},
                   {"tie_word_embeddings", false},
                   {"hidden_act", "silu"},
                   {"torch_dtype", std::string(torch_dtype_name(stored))}};
  if (s.experts) {
    j["num_local_experts"] = s.experts;
    j["num_experts_per_tok"] = s.top_k;
  }
  return j;
}

/// Writes the shape's seeded random-weight Hugging Face directory (config.json,
/// model.safetensors.index.json, model-0000k-of-0000N.safetensors of about
/// equal size) tensor by tensor, so only one tensor is ever in memory. Built
/// in a staging directory and renamed into place; an existing `out` is
/// refused. Returns the bytes of the shards. Fewer than `shards` files are
/// written when the tensors cannot fill them all (a shard holds whole tensors).
inline std::uint64_t write_synthetic_hf(const model_shape& s, index_t layers, dtype stored, index_t shards, std::uint64_t seed, const std::string& out,
                                        index_t context = 2048) {
  namespace fs = std::filesystem;
  using moeforge::detail::cat;
  if (layers < 1 || shards < 1 || context < 1) throw config_error("make-model: layers, shards and context must be positive");
  const fs::path dir = io::output_path(out);
  io::check_output_dir(dir.string(), false);
  const auto plan = hf_tensor_plan(s, layers);
  // Shard of each tensor by its bytes' position in the whole, then renumbered without empty shards.
  std::uint64_t total = 0;
  for (const auto& t : plan) {
    std::uint64_t n = dtype_size(stored);
    for (auto d : t.shape) n *= std::uint64_t(d);
    total += n;
  }
  std::vector<std::vector<io::tensor_info>> files(static_cast<std::size_t>(shards));
  std::vector<std::size_t> file_of;
  std::uint64_t before = 0;
  for (const auto& t : plan) {
    const auto k = std::min<std::size_t>(std::size_t(shards) - 1, std::size_t(before * std::uint64_t(shards) / total));
    auto& f = files[k];
    const std::size_t begin = f.empty() ? 0 : f.back().end;
    std::uint64_t n = dtype_size(stored);
    for (auto d : t.shape) n *= std::uint64_t(d);
    f.push_back({t.name, stored, t.shape, begin, begin + std::size_t(n)});
    file_of.push_back(k);
    before += n;
  }
  std::vector<std::string> names(files.size());
  std::size_t used = 0;
  for (const auto& f : files) used += f.empty() ? 0 : 1;
  nlohmann::json map = nlohmann::json::object();
  for (std::size_t k = 0, i = 0; k < files.size(); ++k) {
    if (files[k].empty()) continue;
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", ++i, used);
    names[k] = name;
    for (const auto& t : files[k]) map[t.name] = names[k];
  }

  io::detail::staging_dir stage(dir);
  const std::map<std::string, std::string> meta{{"format", "pt"}};
  std::vector<std::optional<io::safetensors_writer>> writers(files.size());
  for (std::size_t k = 0; k < files.size(); ++k)
    if (!files[k].empty()) writers[k].emplace((stage.path() / names[k]).string(), io::detail::header_text(files[k], meta).size(), meta);
  random_tensors rnd(seed);
  for (std::size_t i = 0; i < plan.size(); ++i) {
    const auto& t = plan[i];
    if (t.random) {
      const matrix m = rnd.make(t.shape[0], t.shape[1]);
      writers[file_of[i]]->add(t.name, t.shape, m.data(), stored);
    } else {
      const vector v = vector::Ones(t.shape[0]);
      writers[file_of[i]]->add(t.name, t.shape, v.data(), stored);
    }
  }
  for (auto& w : writers)
    if (w) w->finish();
  auto put = [&](const std::string& name, const nlohmann::json& j) {
    std::ofstream f(stage.path() / name);
    f << moeforge::detail::json_text(j, 2) << "\n";
    if (!f.flush()) throw io_error(cat("make-model: cannot write '", (stage.path() / name).string(), "'"));
  };
  put("config.json", hf_config_json(s, layers, context, stored));
  put("model.safetensors.index.json", {{"metadata", {{"total_size", total}}}, {"weight_map", map}});
  stage.commit(dir, false);
  return total;
}

}  // namespace moeforge::bench
