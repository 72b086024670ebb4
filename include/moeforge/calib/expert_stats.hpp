// What the MoE methods measure on calibration tokens, in one pass over a
// layer's routed experts: routing counts and mass (MoNE's frequency), the mean
// and variance of each expert's unweighted output (MoNE's novice and score),
// REAP's gate-weighted output norm, DualSparse's neuron importance, and on
// request every routed pair's output (the output-error search).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <vector>

#include "moeforge/core/moe.hpp"
#include "moeforge/runtime/routing.hpp"
#include "moeforge/runtime/gemm.hpp"

namespace moeforge::calib {

/// Per-dimension mean and sum of squared deviations, updated one sample at a
/// time (Welford) and merged (Chan et al.): numerically stable in double, and
/// merging fixed chunks in a fixed order gives the same bits whatever the
/// number of threads that computed the chunks.
struct running_moments {
  index_t count = 0;
  Eigen::VectorXd mean;
  Eigen::VectorXd m2;

  explicit running_moments(index_t dims = 0) : mean(Eigen::VectorXd::Zero(dims)), m2(Eigen::VectorXd::Zero(dims)) {}

  template <class Row>
  void add(const Row& v) {
    ++count;
    const double inv = 1.0 / double(count);
    for (index_t d = 0; d < mean.size(); ++d) {
      const double x = double(v[d]);
      const double delta = x - mean[d];
      mean[d] += delta * inv;
      m2[d] += delta * (x - mean[d]);
    }
  }

  void merge(const running_moments& o) {
    if (o.count == 0) return;
    if (count == 0) {
      *this = o;
      return;
    }
    const double n = double(count + o.count);
    const Eigen::VectorXd delta = o.mean - mean;
    m2 += o.m2 + delta.cwiseProduct(delta) * (double(count) * double(o.count) / n);
    // As a step by delta (Chan et al.), not mean·wa + o.mean·wb: equal means
    // stay exactly equal, so a constant output keeps variance exactly 0.
    mean += delta * (double(o.count) / n);
    count += o.count;
  }

  /// Population variance per dimension (zero for fewer than one sample).
  Eigen::VectorXd variance() const { return count > 0 ? Eigen::VectorXd(m2 / double(count)) : Eigen::VectorXd::Zero(m2.size()); }
};

/// DualSparse neuron importance, summed over the calibration tokens routed to
/// the expert (g = gate·x, u = up·x; an ungated FFN has act(u) as its only term):
enum class importance_metric {
  none,      ///< original order (the "2T without reconstruction" baseline)
  act,       ///< (a) Σ act(g)
  abs_act,   ///< (b) Σ |act(g)|
  prod,      ///< (c) Σ act(g)·u
  abs_prod,  ///< (d) Σ |act(g)·u|
};

inline std::string_view importance_name(importance_metric m) {
  switch (m) {
    case importance_metric::none: return "none";
    case importance_metric::act: return "a";
    case importance_metric::abs_act: return "b";
    case importance_metric::prod: return "c";
    case importance_metric::abs_prod: return "d";
  }
  return "?";
}

inline constexpr importance_metric all_importance_metrics[] = {importance_metric::none, importance_metric::act, importance_metric::abs_act,
                                                               importance_metric::prod, importance_metric::abs_prod};

/// Parses none|a|b|c|d; throws config_error naming the text.
inline importance_metric parse_importance(std::string_view text) {
  for (auto m : all_importance_metrics)
    if (text == importance_name(m)) return m;
  throw config_error(moeforge::detail::cat("importance metric '", text, "': expected none, a, b, c or d"));
}

struct expert_stats_options {
  /// Neuron importance to accumulate (none: skip it).
  importance_metric importance = importance_metric::none;
  /// Keep every routed pair's unweighted output (memory: pairs × H floats).
  bool keep_outputs = false;
  /// Tokens per accumulation chunk; chunks are merged in order (determinism).
  index_t chunk = 256;
};

/// One expert's calibration statistics. A novice slot has only routing figures.
struct expert_stats {
  index_t routed = 0;       ///< tokens whose top-k selected this expert
  double mass = 0;          ///< Σ of its gate weights over those tokens
  running_moments output;   ///< of its unweighted output over those tokens
  double reap = 0;          ///< Σ gate weight · ‖unweighted output‖₂ over those tokens
  Eigen::VectorXd importance;           ///< [width] when requested
  std::vector<std::int32_t> tokens;     ///< with keep_outputs: the routed tokens, ascending
  std::vector<float> gate;              ///< with keep_outputs: their gate weights
  matrix outputs;                       ///< with keep_outputs: [routed, H] unweighted outputs

  /// MoNE's var: sqrt of the summed per-dimension variance.
  double output_spread() const { return std::sqrt(output.variance().sum()); }
};

struct layer_stats {
  index_t tokens = 0;                ///< calibration tokens
  std::vector<expert_stats> experts; ///< [E]
  runtime::selection selection;      ///< the router's top-k choice (no dropping)
};

namespace detail {

/// Unweighted outputs of neurons [0, width) of `f` for tokens `x` [n, H], and
/// the neurons' activations h [n, width] (before the down projection).
inline void expert_outputs(const ffn& f, const_matrix_ref x, matrix& gate_act, matrix& up, matrix& h, matrix& out) {
  using runtime::detail::rows_of;
  using runtime::detail::times_transpose;
  const index_t w = f.intermediate();
  if (f.gated()) {
    const matrix gu = times_transpose({rows_of(f.gate), rows_of(f.up)}, x);
    gate_act = gu.leftCols(w).unaryExpr([&](float v) { return activate(f.act, v); });
    up = gu.rightCols(w);
    h = gate_act.cwiseProduct(up);
  } else {
    gate_act = times_transpose({rows_of(f.up)}, x).unaryExpr([&](float v) { return activate(f.act, v); });
    up = matrix::Ones(x.rows(), w);
    h = gate_act;
  }
  out = times_transpose({rows_of(f.down)}, h);
}

inline void add_importance(importance_metric m, const matrix& gate_act, const matrix& up, Eigen::VectorXd& acc) {
  for (index_t t = 0; t < gate_act.rows(); ++t)
    for (index_t i = 0; i < gate_act.cols(); ++i) {
      const double a = gate_act(t, i), p = a * double(up(t, i));
      switch (m) {
        case importance_metric::none: break;
        case importance_metric::act: acc[i] += a; break;
        case importance_metric::abs_act: acc[i] += std::abs(a); break;
        case importance_metric::prod: acc[i] += p; break;
        case importance_metric::abs_prod: acc[i] += std::abs(p); break;
      }
    }
}

}  // namespace detail

/// Routes the calibration inputs x [T, H] with the layer's router (top-k, no
/// dropping) and measures every routed expert on the tokens routed to it.
/// Work is split into (expert, token-chunk) tasks merged in order, so the
/// result is bit-identical for any thread count.
inline layer_stats expert_statistics(const moe_layer& m, const_matrix_ref x, const expert_stats_options& opt = {}) {
  using moeforge::detail::cat;
  validate(m, "expert statistics: layer");
  if (x.cols() != m.hidden()) throw shape_error(cat("expert statistics: inputs have ", x.cols(), " features, the layer ", m.hidden()));
  if (x.rows() == 0) throw config_error("expert statistics: zero calibration tokens");
  // A NaN score breaks the top-k's ordering (undefined behaviour in the sort), so refuse it here like the kernel does.
  moeforge::detail::require_finite_rows(x, "expert statistics: calibration token");
  if (opt.chunk < 1) throw config_error(cat("expert statistics: chunk = ", opt.chunk, ", expected >= 1"));
  layer_stats out;
  out.tokens = x.rows();
  out.selection = runtime::select_topk(m.router, runtime::router_probs(m.router, x));
  const auto& sel = out.selection;
  const index_t e_count = m.num_experts(), h = m.hidden();
  std::vector<std::vector<std::int32_t>> tokens(static_cast<std::size_t>(e_count));
  std::vector<std::vector<float>> gates(static_cast<std::size_t>(e_count));
  for (index_t t = 0; t < sel.tokens; ++t)
    for (index_t j = 0; j < sel.k; ++j) {
      const std::size_t i = std::size_t(t * sel.k + j);
      tokens[std::size_t(sel.expert[i])].push_back(std::int32_t(t));
      gates[std::size_t(sel.expert[i])].push_back(sel.weight[i]);
    }
  out.experts.resize(std::size_t(e_count));
  struct task {
    index_t expert, first, count;
  };
  std::vector<task> tasks;
  for (index_t e = 0; e < e_count; ++e) {
    auto& s = out.experts[std::size_t(e)];
    const auto& ex = m.experts[std::size_t(e)];
    s.routed = index_t(tokens[std::size_t(e)].size());
    for (float g : gates[std::size_t(e)]) s.mass += double(g);
    s.output = running_moments(h);
    if (ex.is_novice()) continue;
    if (opt.importance != importance_metric::none) s.importance = Eigen::VectorXd::Zero(ex.width());
    if (opt.keep_outputs) {
      s.tokens = tokens[std::size_t(e)];
      s.gate = gates[std::size_t(e)];
      s.outputs.resize(s.routed, h);
    }
    for (index_t c = 0; c < s.routed; c += opt.chunk) tasks.push_back({e, c, std::min(opt.chunk, s.routed - c)});
  }
  // Per task: its moments, REAP sum and importance, merged in task order below.
  std::vector<running_moments> moments(tasks.size());
  std::vector<double> reap(tasks.size(), 0.0);
  std::vector<Eigen::VectorXd> importance(tasks.size());
  std::vector<std::exception_ptr> failed(tasks.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (std::ptrdiff_t k = 0; k < std::ptrdiff_t(tasks.size()); ++k) try {
      const task& tk = tasks[std::size_t(k)];
      const auto& ex = m.experts[std::size_t(tk.expert)];
      const auto& toks = tokens[std::size_t(tk.expert)];
      matrix xs(tk.count, h), gate_act, up, act, y;
      for (index_t p = 0; p < tk.count; ++p) xs.row(p) = x.row(toks[std::size_t(tk.first + p)]);
      detail::expert_outputs(ex.weights, xs, gate_act, up, act, y);
      running_moments mo(h);
      double r = 0;
      for (index_t p = 0; p < tk.count; ++p) {
        mo.add(y.row(p));
        r += double(gates[std::size_t(tk.expert)][std::size_t(tk.first + p)]) * y.row(p).cast<double>().norm();
      }
      moments[std::size_t(k)] = std::move(mo);
      reap[std::size_t(k)] = r;
      if (opt.importance != importance_metric::none) {
        importance[std::size_t(k)] = Eigen::VectorXd::Zero(ex.width());
        detail::add_importance(opt.importance, gate_act, up, importance[std::size_t(k)]);
      }
      if (opt.keep_outputs) out.experts[std::size_t(tk.expert)].outputs.middleRows(tk.first, tk.count) = y;
    } catch (...) {
      failed[std::size_t(k)] = std::current_exception();
    }
  for (const auto& f : failed)
    if (f) std::rethrow_exception(f);
  for (std::size_t k = 0; k < tasks.size(); ++k) {
    auto& s = out.experts[std::size_t(tasks[k].expert)];
    s.output.merge(moments[k]);
    s.reap += reap[k];
    if (opt.importance != importance_metric::none) s.importance += importance[k];
  }
  return out;
}

}  // namespace moeforge::calib
