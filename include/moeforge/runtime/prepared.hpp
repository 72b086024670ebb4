// Layers prepared for the kernel: every FFN weight packed once into the
// micro-kernel's panel order, so no call repacks weights (the GEMM path) and
// few-token calls stream whole panels. Results are bit-identical to running
// the plain layer (gemm.hpp: the same FMA chain per output element).
//
// A prepared layer owns a copy of the layer it was made from instead of
// referring to it: the panels and the router, widths and novices the plan is
// made from then always describe the same weights. Editing or replacing the
// source layer afterwards (as calibration does between forward passes) cannot
// leave stale panels behind; it leaves the prepared layer computing the layer
// as it was, and prepare() makes a new one. The price is memory: the plain
// weights and the panels are both held (twice the FFN weights in FP32).
#pragma once

#include <utility>
#include <vector>

#include "moeforge/runtime/dense_ffn.hpp"
#include "moeforge/runtime/moe_ffn.hpp"

namespace moeforge::runtime {

/// A dense FFN with its weights in panels.
class prepared_ffn {
 public:
  explicit prepared_ffn(ffn f, detail::weight_format format = {}) : ffn_(std::move(f)) {
    validate(ffn_, "prepared ffn");
    packed_ = detail::pack_ffn(ffn_, {}, format);
  }
  const ffn& weights() const { return ffn_; }
  const detail::packed_ffn& packed() const { return packed_; }

 private:
  ffn ffn_;
  detail::packed_ffn packed_;
};

/// A MoE layer with every expert's weights in panels (see packed_layer).
class prepared_moe {
 public:
  explicit prepared_moe(moe_layer m, detail::weight_format format = {}) : layer_(std::move(m)) {
    validate(layer_, "prepared moe");
    packed_ = detail::pack_layer(layer_, format);
  }
  const moe_layer& layer() const { return layer_; }
  const detail::packed_layer& packed() const { return packed_; }

 private:
  moe_layer layer_;
  detail::packed_layer packed_;
};

/// Prepares a layer for the kernel with its weights in `format` (a dtype,
/// F32 or BF16, converts to one); pass an rvalue to move it in rather than copy it.
inline prepared_ffn prepare(ffn f, detail::weight_format format = {}) { return prepared_ffn(std::move(f), format); }
inline prepared_moe prepare(moe_layer m, detail::weight_format format = {}) { return prepared_moe(std::move(m), format); }

/// dense_forward on prepared weights: the same result, bit for bit.
inline void dense_forward(const prepared_ffn& f, const_matrix_ref x, matrix_ref y) {
  detail::dense_forward_packed(f.weights(), &f.packed(), x, y);
}
inline matrix dense_forward(const prepared_ffn& f, const_matrix_ref x) {
  matrix y(x.rows(), f.weights().hidden());
  dense_forward(f, x, y);
  return y;
}

/// moe_forward on a prepared layer, with a plan made for f.layer(): the same result, bit for bit.
inline void moe_forward(const prepared_moe& m, const routing_plan& plan, const_matrix_ref x, matrix_ref y) {
  detail::moe_forward_packed(m.layer(), &m.packed(), plan, x, y);
}
inline matrix moe_forward(const prepared_moe& m, const_matrix_ref x) {
  matrix y(x.rows(), m.layer().hidden());
  moe_forward(m, route(m.layer(), x, &m.packed().router), x, y);
  return y;
}

}  // namespace moeforge::runtime
