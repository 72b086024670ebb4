// Random weights for tests: matrices, FFNs and MoE layers of any shape, with
// shared experts, sigmoid gates and novices on request.
#pragma once

#include <random>
#include <vector>

#include "moeforge/core/moe.hpp"

namespace moeforge::test {

inline matrix random_matrix(index_t r, index_t c, std::mt19937& rng, float scale = 0.3f) {
  std::normal_distribution<float> n(0.0f, scale);
  matrix m(r, c);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = n(rng);
  return m;
}

/// m as a file storing it in `type` holds it (rounded to nearest even).
inline matrix rounded_to(dtype type, const matrix& m) {
  return m.unaryExpr([type](float v) { return stored_value(type, v); });
}

/// m with every value rounded to the nearest BF16: what BF16 panels hold.
inline matrix rounded_to_bf16(const matrix& m) { return rounded_to(dtype::bf16, m); }

inline void round_to_bf16(ffn& f) {
  for (matrix* w : {&f.gate, &f.up, &f.down}) *w = rounded_to_bf16(*w);
}

inline ffn random_ffn(index_t h, index_t i, std::mt19937& rng, activation a = activation::silu, bool gated = true) {
  ffn f;
  f.act = a;
  if (gated) f.gate = random_matrix(i, h, rng);
  f.up = random_matrix(i, h, rng);
  f.down = random_matrix(h, i, rng);
  return f;
}

/// Unit-variance gate, up and inputs (down scaled by 0.1): CMoE's activations
/// then span a wide range, so markers and rates have real structure to cluster.
inline matrix gaussian(index_t r, index_t c, std::mt19937& rng) { return random_matrix(r, c, rng, 1.0f); }

inline ffn gaussian_ffn(index_t h, index_t n, std::mt19937& rng) {
  ffn f;
  f.gate = gaussian(n, h, rng);
  f.up = gaussian(n, h, rng);
  f.down = gaussian(h, n, rng) * 0.1f;
  return f;
}

struct layer_spec {
  index_t hidden = 37;
  std::vector<index_t> widths{13, 20, 7, 31, 16};
  int shared = 0;
  bool shared_gate = false;
  std::vector<int> novices;
  router_kind kind = router_kind::softmax_topk;
};

inline moe_layer random_layer(const layer_spec& s, std::mt19937& rng) {
  moe_layer m;
  const index_t e = index_t(s.widths.size());
  m.router.kind = s.kind;
  // Router scores small enough that softmax never underflows to exact ties,
  // which float and the double reference would break differently.
  m.router.weight = random_matrix(e, s.hidden, rng, 0.3f);
  if (s.kind == router_kind::cmoe_analytic) m.router.weight_up = random_matrix(e, s.hidden, rng, 0.3f);
  for (index_t w : s.widths) m.experts.push_back({random_ffn(s.hidden, w, rng), {}, 0, {}});
  for (int n : s.novices) {
    m.experts[std::size_t(n)].weights = ffn{};
    m.experts[std::size_t(n)].novice = random_matrix(s.hidden, 1, rng);
  }
  for (int i = 0; i < s.shared; ++i) {
    m.shared.push_back({random_ffn(s.hidden, 11 + 6 * i, rng), {}});
    if (s.shared_gate) m.shared.back().gate = random_matrix(s.hidden, 1, rng);
  }
  return m;
}

}  // namespace moeforge::test
