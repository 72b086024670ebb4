// A plain scalar reference of the router, the MoE layer and the dense FFN,
// written for clarity in double precision; used only to check the kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "moeforge/core/moe.hpp"

namespace moeforge::reference {

inline double act(activation a, double v) {
  switch (a) {
    case activation::silu: return v / (1.0 + std::exp(-v));
    case activation::gelu: return 0.5 * v * (1.0 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
    case activation::relu: return v > 0 ? v : 0;
  }
  return v;
}

/// The first `width` neurons of f applied to one token. (Through row
/// pointers: an element accessor per term was most of the sanitizer passes'
/// time, left as calls at their -O1.)
inline std::vector<double> ffn_token(const ffn& f, const float* x, index_t width) {
  const index_t hidden = f.hidden();
  const bool gated = f.gated();
  std::vector<double> h(std::size_t(width), 0.0);
  for (index_t i = 0; i < width; ++i) {
    const float *up = f.up.row(i).data(), *gate = gated ? f.gate.row(i).data() : nullptr;
    double u = 0, g = 0;
    for (index_t d = 0; d < hidden; ++d) {
      u += double(up[d]) * x[d];
      if (gated) g += double(gate[d]) * x[d];
    }
    h[std::size_t(i)] = gated ? act(f.act, g) * u : act(f.act, u);
  }
  std::vector<double> y(std::size_t(hidden), 0.0);
  for (index_t d = 0; d < hidden; ++d) {
    const float* down = f.down.row(d).data();
    for (index_t i = 0; i < width; ++i) y[std::size_t(d)] += double(down[i]) * h[std::size_t(i)];
  }
  return y;
}

inline matrix dense(const ffn& f, const matrix& x) {
  matrix y(x.rows(), f.hidden());
  for (index_t t = 0; t < x.rows(); ++t) {
    const auto v = ffn_token(f, x.row(t).data(), f.intermediate());
    for (index_t d = 0; d < f.hidden(); ++d) y(t, d) = float(v[std::size_t(d)]);
  }
  return y;
}

/// Router probabilities of one token.
inline std::vector<double> probs(const router& r, const float* x) {
  const index_t e = r.weight.rows();
  std::vector<double> s(static_cast<std::size_t>(e));
  double norm = 0;  // centroid_topk scores the direction of x only
  for (index_t d = 0; d < r.weight.cols(); ++d) norm += double(x[d]) * x[d];
  norm = std::sqrt(norm);
  for (index_t j = 0; j < e; ++j) {
    double a = 0, b = 0;
    for (index_t d = 0; d < r.weight.cols(); ++d) {
      a += double(r.weight(j, d)) * x[d];
      if (r.kind == router_kind::cmoe_analytic) b += double(r.weight_up(j, d)) * x[d];
    }
    if (r.kind == router_kind::centroid_topk) a = norm > 0 ? a / norm : 0.0;
    s[std::size_t(j)] = r.kind == router_kind::cmoe_analytic ? std::abs(act(activation::silu, a) * b) : a;
  }
  const double mx = *std::max_element(s.begin(), s.end());
  double sum = 0;
  for (auto& v : s) sum += v = std::exp(v - mx);
  for (auto& v : s) v /= sum;
  return s;
}

/// Experts chosen for one token, best first, ties to the lower index.
inline std::vector<index_t> top_k(const std::vector<double>& p, index_t k) {
  std::vector<index_t> order(p.size());
  for (std::size_t i = 0; i < p.size(); ++i) order[i] = index_t(i);
  std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return p[std::size_t(a)] > p[std::size_t(b)]; });
  order.resize(std::size_t(k));
  return order;
}

/// One MoE token with an explicit choice: `experts[j]` computed over its first
/// `widths[j]` neurons (0 = dropped) and scaled by `weights[j]`.
inline std::vector<double> moe_token(const moe_layer& m, const float* x, const std::vector<index_t>& experts,
                                     const std::vector<double>& weights, const std::vector<index_t>& widths) {
  std::vector<double> y(std::size_t(m.hidden()), 0.0);
  for (const auto& s : m.shared) {
    double g = 1.0;
    if (s.gated()) {
      double a = 0;
      for (index_t d = 0; d < m.hidden(); ++d) a += double(s.gate[d]) * x[d];
      g = 1.0 / (1.0 + std::exp(-a));
    }
    const auto v = ffn_token(s.weights, x, s.weights.intermediate());
    for (std::size_t d = 0; d < y.size(); ++d) y[d] += g * v[d];
  }
  for (std::size_t j = 0; j < experts.size(); ++j) {
    if (widths[j] == 0 && !m.experts[std::size_t(experts[j])].is_novice()) continue;
    const auto& ex = m.experts[std::size_t(experts[j])];
    if (ex.is_novice()) {
      for (std::size_t d = 0; d < y.size(); ++d) y[d] += weights[j] * ex.novice[index_t(d)];
      continue;
    }
    const auto v = ffn_token(ex.weights, x, widths[j]);
    for (std::size_t d = 0; d < y.size(); ++d) y[d] += weights[j] * v[d];
  }
  return y;
}

/// The whole layer with its own router, every selected expert in full.
inline matrix moe(const moe_layer& m, const matrix& x) {
  matrix y(x.rows(), m.hidden());
  for (index_t t = 0; t < x.rows(); ++t) {
    const auto p = probs(m.router, x.row(t).data());
    const auto chosen = top_k(p, m.router.top_k);
    double sum = 0;
    for (auto e : chosen) sum += p[std::size_t(e)];
    std::vector<double> w;
    std::vector<index_t> widths;
    for (auto e : chosen) {
      double g = m.router.kind == router_kind::softmax_topk ? p[std::size_t(e)] : 1.0;
      if (m.router.kind == router_kind::softmax_topk && m.router.renormalize) g /= sum;
      w.push_back(g * m.router.scale);
      widths.push_back(m.experts[std::size_t(e)].width());
    }
    const auto v = moe_token(m, x.row(t).data(), chosen, w, widths);
    for (index_t d = 0; d < m.hidden(); ++d) y(t, d) = float(v[std::size_t(d)]);
  }
  return y;
}

}  // namespace moeforge::reference
