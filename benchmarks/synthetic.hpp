// Seeded random-weight models of published shapes, built in memory: what the
// whole-model benchmark runs when no checkpoint is given. The weights are
// random, so only speed (never quality) means anything on them.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "moeforge/convert/cmoe.hpp"
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
/// always-on experts of the same width, with a random softmax router.
inline moe_layer random_moe(random_tensors& rnd, index_t hidden, index_t shared, index_t experts, index_t top_k, index_t width) {
  moe_layer m;
  m.router.kind = router_kind::softmax_topk;
  m.router.weight = rnd.make(experts, hidden);
  m.router.top_k = top_k;
  m.router.renormalize = true;
  for (index_t e = 0; e < experts; ++e) m.experts.push_back({rnd.make_ffn(hidden, width), vector(), 0, {}});
  for (index_t s = 0; s < shared; ++s) m.shared.push_back({rnd.make_ffn(hidden, width), vector()});
  return m;
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
  convert::cmoe_config layout;
  if (!moe.empty()) {
    if (s.experts) throw config_error("--moe " + moe + ": shape '" + s.name + "' is already an MoE");
    layout = convert::parse_cmoe_config(moe);
    convert::validate(layout, s.intermediate);
  }
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

}  // namespace moeforge::bench
