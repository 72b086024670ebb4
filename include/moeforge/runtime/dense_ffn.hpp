// The dense FFN kernel: the baseline every MoE speedup is measured against.
// PLACEHOLDER implementation (plain Eigen) until the OpenMP kernel lands.
#pragma once

#include "moeforge/core/ffn.hpp"

namespace moeforge::runtime {

/// y [T, H] = ffn(x [T, H]); y is overwritten.
inline void dense_forward(const ffn& f, const_matrix_ref x, matrix_ref y) {
  detail::require_shape(y, x.rows(), f.hidden(), "dense ffn output");
  matrix h = x * f.up.transpose();
  if (f.gated()) {
    const matrix g = x * f.gate.transpose();
    h = h.cwiseProduct(g.unaryExpr([&](float v) { return activate(f.act, v); }));
  } else {
    h = h.unaryExpr([&](float v) { return activate(f.act, v); });
  }
  y.noalias() = h * f.down.transpose();
}

inline matrix dense_forward(const ffn& f, const_matrix_ref x) {
  matrix y(x.rows(), f.hidden());
  dense_forward(f, x, y);
  return y;
}

}  // namespace moeforge::runtime
