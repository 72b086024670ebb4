// A small model with one of everything a model format must carry (native
// and packed directories are tested on it).
#pragma once

#include <random>
#include <utility>

#include "moeforge/model/transformer.hpp"
#include "support/random.hpp"

namespace moeforge::test {

/// A small model with one of everything the format must carry: a dense FFN, a
/// Mixtral-style MoE with a gated shared expert, a novice and a major width,
/// a CMoE analytic router with ungated gelu experts, attention biases and an
/// untied classifier.
inline model::weights everything_model() {
  std::mt19937 rng(7);
  model::weights w;
  auto& c = w.config;
  c.arch = "test";
  c.dim = 24;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 6;
  c.vocab_size = 40;
  c.seq_len = 32;
  c.rope = model::rope_style::half_split;
  c.tied_embeddings = false;
  w.tok_emb = random_matrix(c.vocab_size, c.dim, rng);
  w.lm_head = random_matrix(c.vocab_size, c.dim, rng);
  w.final_norm = random_matrix(c.dim, 1, rng);
  for (index_t l = 0; l < c.n_layers; ++l) {
    model::layer x;
    x.attn_norm = random_matrix(c.dim, 1, rng);
    x.ffn_norm = random_matrix(c.dim, 1, rng);
    x.wq = random_matrix(c.n_heads * c.head_dim, c.dim, rng);
    x.wk = random_matrix(c.n_kv_heads * c.head_dim, c.dim, rng);
    x.wv = random_matrix(c.n_kv_heads * c.head_dim, c.dim, rng);
    x.wo = random_matrix(c.dim, c.n_heads * c.head_dim, rng);
    w.layers.push_back(std::move(x));
  }
  w.layers[0].ffn = random_ffn(c.dim, 19, rng);

  layer_spec mixtral;
  mixtral.hidden = c.dim;
  mixtral.widths = {9, 14, 5, 11};
  mixtral.shared = 1;
  mixtral.shared_gate = true;
  mixtral.novices = {2};
  moe_layer m1 = random_layer(mixtral, rng);
  m1.router.top_k = 2;
  m1.router.renormalize = false;
  m1.router.scale = 1.5f;
  m1.experts[1].major = 4;
  w.layers[1].ffn = std::move(m1);
  w.layers[1].bq = random_matrix(c.n_heads * c.head_dim, 1, rng);
  w.layers[1].bk = random_matrix(c.n_kv_heads * c.head_dim, 1, rng);
  w.layers[1].bv = random_matrix(c.n_kv_heads * c.head_dim, 1, rng);

  layer_spec analytic;
  analytic.hidden = c.dim;
  analytic.widths = {8, 8, 8};
  analytic.kind = router_kind::cmoe_analytic;
  moe_layer m2 = random_layer(analytic, rng);
  for (auto& e : m2.experts) e.weights = random_ffn(c.dim, 8, rng, activation::gelu, false);
  m2.router.top_k = 1;
  w.layers[2].ffn = std::move(m2);
  model::validate(w);
  return w;
}


}  // namespace moeforge::test
