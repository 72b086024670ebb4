// The sparse MoE FFN kernel: executes a routing plan over tokens x [T, H].
// PLACEHOLDER implementation (Eigen per expert) until the OpenMP kernel lands;
// the signatures below are the stable API.
#pragma once

#include "moeforge/runtime/dense_ffn.hpp"
#include "moeforge/runtime/routing.hpp"

namespace moeforge::runtime {

/// y [T, H] = Σ_shared w_s(t)·shared_s(x_t) + Σ_pairs w·expert_e[:width](x_t)
/// (a novice pair adds w·novice). y is overwritten.
inline void moe_forward(const moe_layer& m, const routing_plan& plan, const_matrix_ref x, matrix_ref y) {
  const index_t t_count = x.rows();
  detail::require_shape(y, t_count, m.hidden(), "moe output");
  y.setZero();
  for (std::size_t s = 0; s < m.shared.size(); ++s) {
    const matrix o = dense_forward(m.shared[s].weights, x);
    for (index_t t = 0; t < t_count; ++t) y.row(t) += plan.shared_weight[s * std::size_t(t_count) + std::size_t(t)] * o.row(t);
  }
  for (index_t e = 0; e < plan.experts(); ++e) {
    const auto& ex = m.experts[std::size_t(e)];
    for (index_t p = plan.offsets[std::size_t(e)]; p < plan.offsets[std::size_t(e + 1)]; ++p) {
      const index_t t = plan.token[std::size_t(p)];
      if (ex.is_novice()) {
        y.row(t) += plan.weight[std::size_t(p)] * ex.novice.transpose();
        continue;
      }
      const index_t w = plan.width[std::size_t(p)];
      const auto& f = ex.weights;
      vector h = f.up.topRows(w) * x.row(t).transpose();
      if (f.gated()) {
        const vector g = f.gate.topRows(w) * x.row(t).transpose();
        for (index_t i = 0; i < w; ++i) h[i] *= activate(f.act, g[i]);
      } else {
        for (index_t i = 0; i < w; ++i) h[i] = activate(f.act, h[i]);
      }
      y.row(t) += plan.weight[std::size_t(p)] * (f.down.leftCols(w) * h).transpose();
    }
  }
}

/// Routes x with the layer's router and runs every selected expert in full.
inline matrix moe_forward(const moe_layer& m, const_matrix_ref x) {
  matrix y(x.rows(), m.hidden());
  moe_forward(m, route(m, x), x, y);
  return y;
}

}  // namespace moeforge::runtime
