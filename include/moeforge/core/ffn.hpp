// The feed-forward block: a gated FFN `down · (act(gate·x) ⊙ (up·x))` or an
// ungated one `down · act(up·x)`, with weights in Hugging Face [out, in] layout.
#pragma once

#include <cmath>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "moeforge/core/activation.hpp"
#include "moeforge/core/tensor.hpp"

namespace moeforge {

/// The shape of an FFN whose matrices were released (see release(ffn&)).
struct ffn_shape {
  index_t hidden = 0, intermediate = 0;
  bool gated = false;
};

/// A feed-forward block of `intermediate()` neurons. Neuron i is row i of
/// `gate` and `up` and column i of `down`. `gate` is empty for ungated FFNs.
///   gate: [I, H]   up: [I, H]   down: [H, I]
struct ffn {
  matrix gate;
  matrix up;
  matrix down;
  activation act = activation::silu;
  /// Set by release(ffn&): the matrices are gone (their values live only in a
  /// runtime's prepared panels) and this is the shape they had, which is all
  /// routing and the prepared kernels ask of the plain FFN.
  std::optional<ffn_shape> released = std::nullopt;

  bool gated() const { return released ? released->gated : gate.size() != 0; }
  index_t hidden() const { return released ? released->hidden : up.cols(); }
  index_t intermediate() const { return released ? released->intermediate : up.rows(); }
  /// What a neuron costs a token, the unit work is counted in (routing's
  /// route_stats, the models' active fractions): the weight rows it reads,
  /// 3 gated (gate, up, down), 2 not.
  double neuron_cost() const { return gated() ? 3.0 : 2.0; }
};

/// Passes m's storage to `reuse(matrix&&)` and leaves m empty.
template <class Reuse>
void hand_back(matrix& m, Reuse&& reuse) {
  reuse(std::move(m));
  m = matrix();  // a moved-from Eigen matrix is empty already; this says so
}

/// Frees f's matrices, keeping its shape: an owning transformer does this
/// once the weights are packed, so they are resident once, in the run dtype.
/// `reuse(matrix&&)` is handed each matrix to keep its storage for later
/// (loading reads the next layer into it: detail::matrix_pool).
template <class Reuse>
void release(ffn& f, Reuse&& reuse) {
  f.released = ffn_shape{f.hidden(), f.intermediate(), f.gated()};
  for (matrix* m : {&f.gate, &f.up, &f.down}) hand_back(*m, reuse);
}
inline void release(ffn& f) {
  release(f, [](matrix&&) {});
}

/// Throws config_error naming `what` when f's matrices were released: code
/// that reads plain weights must not see empty ones as an FFN.
inline void require_held(const ffn& f, const std::string& what) {
  if (f.released)
    throw config_error(detail::cat(what, ": the FFN's weights were released (they live only in an owning transformer's packed panels)"));
}

/// Throws shape_error if the three matrices do not form one FFN over `hidden`
/// features (pass hidden < 0 to take it from `up`).
inline void validate(const ffn& f, const std::string& what, index_t hidden = -1) {
  require_held(f, what);
  const index_t h = hidden < 0 ? f.up.cols() : hidden;
  const index_t i = f.up.rows();
  if (i == 0) throw shape_error(detail::cat(what, ": no neurons (up has 0 rows)"));
  detail::require_shape(f.up, i, h, what + ".up");
  if (f.gated()) detail::require_shape(f.gate, i, h, what + ".gate");
  detail::require_shape(f.down, h, i, what + ".down");
}

/// Throws value_error on the first NaN or Inf weight.
inline void require_finite(const ffn& f, const std::string& what) {
  require_held(f, what);
  detail::require_finite(f.gate, what + ".gate");
  detail::require_finite(f.up, what + ".up");
  detail::require_finite(f.down, what + ".down");
}

/// Number of weights in the FFN.
inline index_t parameter_count(const ffn& f) { return (f.gated() ? 3 : 2) * f.intermediate() * f.hidden(); }

/// The FFN restricted to the given neurons, in the given order.
template <class Indices>
ffn select_neurons(const ffn& f, const Indices& neurons) {
  require_held(f, "select_neurons");
  const index_t n = index_t(std::size(neurons));
  ffn out;
  out.act = f.act;
  out.up.resize(n, f.hidden());
  out.down.resize(f.hidden(), n);
  if (f.gated()) out.gate.resize(n, f.hidden());
  const std::vector<index_t> index(std::begin(neurons), std::end(neurons));
  for (index_t j = 0; j < n; ++j) {
    out.up.row(j) = f.up.row(index[std::size_t(j)]);
    if (f.gated()) out.gate.row(j) = f.gate.row(index[std::size_t(j)]);
  }
  // Down row by row: a column walk would touch one cache line per element.
  for (index_t h = 0; h < f.hidden(); ++h) {
    const float* src = f.down.row(h).data();
    float* dst = out.down.row(h).data();
    for (index_t j = 0; j < n; ++j) dst[j] = src[index[std::size_t(j)]];
  }
  return out;
}

}  // namespace moeforge
