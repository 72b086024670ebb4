// moeforge's conversion beyond the CMoE paper, all training-free and fitted on
// the calibration inputs of one layer with the experts' partition fixed:
//   - fitted routers: ridge regression from [x, 1] (linear_topk) or from
//     [x, 1, quadratic terms of a rank-r PCA projection of x] (quadratic_topk)
//     to each routed expert's output norm (its deviation from its mean when
//     novice compensation is on: what leaving the expert out costs);
//   - novice compensation: an expert a token does not compute contributes its
//     mean calibration output (moeforge::novice_compensation);
//   - closed-form refit: with routing and compensation fixed, the down
//     projections of the shared and routed experts are refitted jointly so
//     the layer reproduces the dense FFN on the calibration tokens.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <limits>
#include <cstddef>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Cholesky>
#include <Eigen/Eigenvalues>
#include <nlohmann/json.hpp>

#include "moeforge/core/moe.hpp"
#include "moeforge/runtime/dense_ffn.hpp"
#include "moeforge/runtime/moe_ffn.hpp"
#include "moeforge/runtime/project.hpp"

namespace moeforge::convert {

/// Which router a converted layer gets.
enum class router_fit {
  analytic,   ///< the paper's router from representative neurons (router_kind::cmoe_analytic)
  linear,     ///< router_kind::linear_topk, fitted
  quadratic,  ///< router_kind::quadratic_topk, fitted
};
enum class compensation_mode { none, novice };
enum class refit_mode { none, down };

inline std::string_view router_fit_name(router_fit r) {
  return r == router_fit::analytic ? "analytic" : r == router_fit::linear ? "linear" : "quadratic";
}
inline std::string_view compensation_name(compensation_mode c) { return c == compensation_mode::none ? "none" : "novice"; }
inline std::string_view refit_name(refit_mode r) { return r == refit_mode::none ? "none" : "down"; }

/// Parse the names above; throw config_error naming the option and the choices.
inline router_fit parse_router_fit(const std::string& text) {
  for (auto r : {router_fit::analytic, router_fit::linear, router_fit::quadratic})
    if (text == router_fit_name(r)) return r;
  throw config_error(moeforge::detail::cat("cmoe router '", text, "': expected 'analytic', 'linear' or 'quadratic'"));
}
inline compensation_mode parse_compensation(const std::string& text) {
  for (auto c : {compensation_mode::none, compensation_mode::novice})
    if (text == compensation_name(c)) return c;
  throw config_error(moeforge::detail::cat("cmoe compensate '", text, "': expected 'none' or 'novice'"));
}
inline refit_mode parse_refit(const std::string& text) {
  for (auto r : {refit_mode::none, refit_mode::down})
    if (text == refit_name(r)) return r;
  throw config_error(moeforge::detail::cat("cmoe refit '", text, "': expected 'none' or 'down'"));
}

struct fit_options {
  router_fit router = router_fit::analytic;
  index_t rank = 16;  ///< quadratic router: rank r of the projection (at most the hidden size)
  compensation_mode compensate = compensation_mode::none;
  refit_mode refit = refit_mode::none;
  /// Rounds of (router fit, compensation, refit); every later round fits the
  /// router and the means to the experts the previous round refitted.
  index_t rounds = 1;
  /// Router ridge: λ_i = router_ridge · G_ii on the feature Gram G (scale-free,
  /// so x and the quadratic terms are shrunk alike).
  double router_ridge = 1e-6;
  /// Refit ridge: λ = refit_ridge · trace(A) / N on the activation Gram A of
  /// the N refitted neurons, shrinking toward the original down projections
  /// (so a layer that can reproduce the dense FFN exactly still does).
  double refit_ridge = 1e-3;
  /// Layer-local distillation after the other steps: this many full-batch Adam
  /// steps on the gate, up and down projections of every expert, routing and
  /// compensation fixed, minimising the squared error to the dense FFN on the
  /// calibration tokens (0: off). Meant for small models: it keeps every
  /// block's activations of all calibration tokens.
  index_t distill_steps = 0;
  double distill_lr = 1e-3;  ///< Adam step size
  /// Size rule (the `best` preset turns it on): keeps the fitting steps'
  /// time and memory in proportion to the paper's conversion at any width.
  /// Per layer of hidden size H and I neurons, with the active and shared
  /// neurons n_a that a token computes:
  ///   - the fitting steps use the first max(4096, 2^36 / (H·I)) calibration
  ///     tokens (all of them for stories260K; 4096 for a LLaMA-7B layer);
  ///   - the joint refit runs only while its system has at most 4096 unknowns
  ///     per output (a 128 MB Gram; LLaMA-7B's 11008 neurons are not refitted:
  ///     a 1 GB system, fitted on fewer tokens than unknowns);
  ///   - distillation runs only while steps · tokens · n_a · H ≤ 2^36
  ///     multiply-adds (its activations and time grow with all four).
  /// What the rule skipped is listed in the report (fit_report::skipped).
  bool size_rule = false;

  /// True when any step needs calibration inputs beyond the markers.
  bool fits() const {
    return router != router_fit::analytic || compensate != compensation_mode::none || refit != refit_mode::none || distill_steps > 0;
  }
};

/// Throws config_error naming the option unless `o` is usable (rank against
/// the hidden size is checked per layer, by fit_layer).
inline void validate(const fit_options& o) {
  if (o.router == router_fit::quadratic && o.rank < 1)
    throw config_error(moeforge::detail::cat("cmoe: rank = ", o.rank, ", expected >= 1 (the quadratic router's projection rank)"));
  if (o.rounds < 1) throw config_error(moeforge::detail::cat("cmoe: rounds = ", o.rounds, ", expected >= 1"));
  if (!(o.router_ridge >= 0) || !(o.refit_ridge >= 0))
    throw config_error("cmoe: router_ridge and refit_ridge must be >= 0");
  if (o.distill_steps < 0) throw config_error(moeforge::detail::cat("cmoe: distill_steps = ", o.distill_steps, ", expected >= 0"));
  if (o.distill_steps > 0 && !(o.distill_lr > 0)) throw config_error(moeforge::detail::cat("cmoe: distill_lr = ", o.distill_lr, ", expected > 0"));
}

/// What fitting did to one layer: the relative calibration error
/// ‖layer(x) − dense(x)‖² / ‖dense(x)‖² after each step, in order.
struct fit_report {
  std::vector<std::pair<std::string, double>> errors;
  std::vector<double> seconds;  ///< [errors] each step's time, its error measurement included
  double router_macs = 0;  ///< multiply-adds per token of the final router (fitted kinds)
  index_t tokens = 0;      ///< calibration tokens the fitting steps used
  std::vector<std::string> skipped;  ///< steps the size rule left out, with the reason
};

inline nlohmann::json to_json(const fit_report& r) {
  nlohmann::json e = nlohmann::json::array();
  for (std::size_t i = 0; i < r.errors.size(); ++i)
    e.push_back({{"step", r.errors[i].first}, {"relative_error", r.errors[i].second}, {"seconds", i < r.seconds.size() ? r.seconds[i] : 0.0}});
  return {{"calibration_error", e}, {"router_macs_per_token", r.router_macs}, {"fit_tokens", r.tokens}, {"skipped", r.skipped}};
}

/// The size rule's limits (fit_options::size_rule).
constexpr double size_rule_macs = 68719476736.0;  // 2^36
constexpr index_t size_rule_min_tokens = 4096;
constexpr index_t size_rule_max_unknowns = 4096;

/// Calibration tokens the fitting steps of a layer (H, I) use out of `tokens`.
inline index_t fit_tokens(const fit_options& o, index_t hidden, index_t neurons, index_t tokens) {
  if (!o.size_rule) return tokens;
  const double cap = std::max(double(size_rule_min_tokens), std::floor(size_rule_macs / (double(hidden) * double(neurons))));
  return index_t(std::min(double(tokens), cap));
}

namespace detail {

using dmatrix = Eigen::MatrixXd;

/// Eigen's GEMM and factorisations pick their blocking from the thread count
/// and from the cache sizes they detect, and split work across OpenMP
/// threads, so their rounding would depend on OMP_NUM_THREADS and on the
/// machine (stories260K's best preset wrote other bytes on a host reporting a
/// 508 MiB L3). While this guard lives they run on one thread (callers
/// parallelise over independent blocks themselves) with fixed cache sizes.
/// Guards nest; the outermost one puts Eigen back to following OpenMP (-1)
/// and to the sizes it had. Conversions run from one thread, so the depth
/// needs no lock; Eigen's settings are process-wide, so Eigen products that
/// other threads run meanwhile are blocked for these caches too.
struct eigen_reproducible {
  // A Zen core's caches (L3 of one 8-core complex): blocks that suit any current x86 machine.
  static constexpr std::ptrdiff_t l1 = 32 << 10, l2 = 1 << 20, l3 = 32 << 20;
  eigen_reproducible() {
    if (state().depth++ > 0) return;
    state().sizes = {Eigen::l1CacheSize(), Eigen::l2CacheSize(), Eigen::l3CacheSize()};
    Eigen::setNbThreads(1);
    Eigen::setCpuCacheSizes(l1, l2, l3);
  }
  ~eigen_reproducible() {
    if (--state().depth > 0) return;
    Eigen::setNbThreads(-1);
    const auto& s = state().sizes;
    Eigen::setCpuCacheSizes(s[0], s[1], s[2]);
  }
  eigen_reproducible(const eigen_reproducible&) = delete;
  eigen_reproducible& operator=(const eigen_reproducible&) = delete;

 private:
  struct saved {
    int depth = 0;
    std::array<std::ptrdiff_t, 3> sizes{};
  };
  static saved& state() {
    static saved s;
    return s;
  }
};

using runtime::neuron_activations;

/// Tokens per block of an expert's outputs (one product per block).
constexpr index_t reduce_block = 2048;

/// What fitting the router and the compensation needs from every routed
/// expert's outputs on x [T, H]: their means [E, H] (when `want_means`) and
/// scores [T, E] = ‖out_e(x_t) − centre_e‖ (when `want_scores`; centre: the
/// means, or 0 without them). One pass per expert, which keeps that expert's
/// [T, H] outputs while it runs (one expert per thread).
inline void expert_outputs(const moe_layer& m, const_matrix_ref x, bool want_means, bool want_scores, matrix& means, matrix& scores) {
  const index_t e = m.num_experts(), h = m.hidden(), t = x.rows();
  means = want_means ? matrix::Zero(e, h) : matrix();
  scores = want_scores ? matrix(t, e) : matrix();
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t j = 0; j < e; ++j) {
    const ffn& f = m.experts[std::size_t(j)].weights;
    matrix out(t, h);
    for (index_t t0 = 0; t0 < t; t0 += reduce_block) {
      const index_t n = std::min(reduce_block, t - t0);
      out.middleRows(t0, n) = runtime::project(neuron_activations(f, x.middleRows(t0, n)), f.down);
    }
    if (want_means) {
      Eigen::VectorXd sum = Eigen::VectorXd::Zero(h);
      for (index_t p = 0; p < t; ++p) sum += out.row(p).transpose().cast<double>();
      means.row(j) = (sum / double(std::max<index_t>(t, 1))).cast<float>().transpose();
      out.rowwise() -= means.row(j);
    }
    if (want_scores)
      for (index_t p = 0; p < t; ++p) scores(p, j) = out.row(p).norm();
  }
}

/// aᵀ·b in double for float matrices. Wide products (the router's Gram at
/// LLaMA widths) are split into column tiles computed in parallel, each on
/// one thread, so the result does not depend on the thread count; a Gram
/// (b is a) computes only the tiles' upper parts and mirrors them.
inline dmatrix cross(const matrix& a, const matrix& b) {
  constexpr index_t tile = 256;
  const bool gram = &a == &b;
  const dmatrix ad = a.cast<double>(), bd = gram ? dmatrix() : b.cast<double>();
  const dmatrix& bb = gram ? ad : bd;
  dmatrix out(a.cols(), b.cols());
  const index_t tiles = (b.cols() + tile - 1) / tile;
#pragma omp parallel for schedule(dynamic, 1) if (tiles > 1 && double(a.rows()) * double(a.cols()) * double(b.cols()) >= 1e9)
  for (index_t q = 0; q < tiles; ++q) {
    const index_t c0 = q * tile, n = std::min(tile, b.cols() - c0), rows = gram ? c0 + n : a.cols();
    out.block(0, c0, rows, n).noalias() = ad.leftCols(rows).transpose() * bb.middleCols(c0, n);
  }
  if (gram)
    for (index_t q = 1; q < tiles; ++q) {
      const index_t c0 = q * tile, n = std::min(tile, b.cols() - c0);
      out.block(c0, 0, n, c0) = out.block(0, c0, c0, n).transpose();
    }
  return out;
}

/// Ridge solution w [d, E] of features f [T, d] → targets y [T, E], with
/// λ_i = ridge · G_ii (a constant feature is shrunk like any other).
inline dmatrix ridge(const matrix& f, const matrix& y, double ridge_factor) {
  dmatrix g = cross(f, f);
  dmatrix rhs = cross(f, y);
  for (index_t i = 0; i < g.rows(); ++i) g(i, i) += ridge_factor * g(i, i) + 1e-12;
  return g.ldlt().solve(rhs);
}

/// The top-`rank` principal directions of x [T, H] as rows P [rank, H] and
/// the offset c = −P·mean(x), so z = P·x + c is centred on the calibration data.
/// Above this hidden size the principal directions come from subspace
/// iteration: a full eigendecomposition of a 4096-wide covariance takes
/// longer than the rest of a LLaMA-7B layer's conversion.
constexpr index_t exact_pca_max_hidden = 512;

/// Makes v's columns orthonormal, spanning what they spanned where they are
/// numerically independent (a dependent column becomes some direction
/// orthogonal to the ones before it, or stays zero if it is exactly zero):
/// Gram–Schmidt run twice over each column, which is orthonormal to working
/// precision however close to dependent the columns are. Subspace iteration
/// needs only some orthonormal basis of the span. HouseholderQR's Q gives
/// one too, but its templates cost every translation unit that includes this
/// header ~7 s of g++ -O3, and this is faster at H = 4096 (0.8 against
/// 7.7 ms at k = 32, 61 against 93 at k = 272); either costs ~k/T of the
/// iteration's products, under 1% at the default rank and a few thousand tokens.
inline void orthonormalize_columns(dmatrix& v) {
  for (index_t j = 0; j < v.cols(); ++j)
    for (int pass = 0; pass < 2; ++pass) {  // normalised between passes: a dependent column's remainder is rounding noise
      const Eigen::VectorXd along = v.leftCols(j).transpose() * v.col(j);
      v.col(j) -= v.leftCols(j) * along;
      v.col(j).normalize();
    }
}

/// The eigenvectors (columns, descending eigenvalues) of the centred x's
/// covariance: all of them for narrow x, else the top `rank` by 24 steps of
/// subspace iteration with 16 extra directions and a Rayleigh–Ritz rotation
/// (products in float through the kernel, thread-count independent).
inline dmatrix principal_directions(const_matrix_ref x, const Eigen::RowVectorXd& mean, index_t rank) {
  const index_t h = x.cols();
  if (h <= exact_pca_max_hidden) {
    const dmatrix centred = x.cast<double>().rowwise() - mean;
    const dmatrix cov = centred.transpose() * centred / double(std::max<index_t>(x.rows(), 1));
    Eigen::SelfAdjointEigenSolver<dmatrix> es(cov);
    return es.eigenvectors().rowwise().reverse();
  }
  const matrix xc = x.rowwise() - mean.cast<float>();
  const matrix xt = xc.transpose();
  const index_t k = std::min(h, rank + 16);
  // A seeded start (mt19937_64's raw output is the same everywhere) so the result is reproducible.
  std::mt19937_64 rng(16);
  dmatrix v(h, k);
  for (index_t i = 0; i < v.size(); ++i) v.data()[i] = double(rng() >> 11) * 0x1.0p-53 - 0.5;
  for (int it = 0; it < 24; ++it) {
    orthonormalize_columns(v);
    const matrix y = runtime::project(xc, matrix(v.transpose().cast<float>()));   // [T, k]
    v = runtime::project(xt, matrix(y.transpose())).cast<double>();                 // [H, k] = xcᵀ·xc·v
  }
  orthonormalize_columns(v);
  const dmatrix y = runtime::project(xc, matrix(v.transpose().cast<float>())).cast<double>();
  Eigen::SelfAdjointEigenSolver<dmatrix> es(y.transpose() * y);
  return (v * es.eigenvectors()).rowwise().reverse();
}

inline void principal_projection(const_matrix_ref x, index_t rank, matrix& p, vector& c) {
  const Eigen::RowVectorXd mean = x.cast<double>().colwise().mean();
  const dmatrix dirs = principal_directions(x, mean, rank);
  const index_t h = x.cols();
  p.resize(rank, h);
  for (index_t r = 0; r < rank; ++r) {
    Eigen::VectorXd v = dirs.col(r);
    // A fixed sign (largest entry positive) so the stored projection does not
    // depend on the solver's arbitrary choice.
    index_t at = 0;
    v.cwiseAbs().maxCoeff(&at);
    if (v(at) < 0) v = -v;
    p.row(r) = v.cast<float>().transpose();
  }
  c = -(p.cast<double>() * mean.transpose()).cast<float>();
}

/// ‖y − target‖² / ‖target‖² for y = the layer's output on x.
inline double relative_error(const moe_layer& m, const_matrix_ref x, const matrix& target) {
  const matrix y = runtime::moe_forward(m, x);
  const double den = target.cast<double>().squaredNorm();
  return den > 0 ? (y - target).cast<double>().squaredNorm() / den : 0.0;
}

/// One fitted block of neurons: the shared expert s or routed expert e.
struct refit_block {
  ffn* weights;
  std::vector<std::int32_t> tokens;  ///< ascending
  std::vector<float> scale;          ///< the tokens' multipliers (gate weight, shared weight)
  index_t offset = 0;                ///< first unknown of the block
  matrix h;                          ///< scaled activations [tokens, width]
};

/// The blocks of `m` under `plan`: every shared expert over all tokens, then
/// every computed routed expert over its tokens (novices are not fitted).
inline std::vector<refit_block> blocks_of(moe_layer& m, const runtime::routing_plan& plan) {
  const index_t t = plan.tokens;
  std::vector<refit_block> blocks;
  index_t n = 0;
  for (std::size_t s = 0; s < m.shared.size(); ++s) {
    refit_block b{&m.shared[s].weights, {}, {}, n, {}};
    for (index_t p = 0; p < t; ++p) {
      b.tokens.push_back(std::int32_t(p));
      b.scale.push_back(plan.shared_weight[s * std::size_t(t) + std::size_t(p)]);
    }
    n += b.weights->intermediate();
    blocks.push_back(std::move(b));
  }
  for (index_t e = 0; e < m.num_experts(); ++e) {
    auto& ex = m.experts[std::size_t(e)];
    if (ex.is_novice()) continue;
    refit_block b{&ex.weights, {}, {}, n, {}};
    for (index_t p = plan.offsets[std::size_t(e)]; p < plan.offsets[std::size_t(e + 1)]; ++p) {
      if (plan.width[std::size_t(p)] != ex.width())
        throw config_error("cmoe fit: a pair computes part of an expert (drop policy); fit before sparsifying");
      b.tokens.push_back(plan.token[std::size_t(p)]);
      b.scale.push_back(plan.weight[std::size_t(p)]);
    }
    n += ex.width();
    blocks.push_back(std::move(b));
  }
  return blocks;
}

/// Rows `rows` of x, in order.
inline matrix gather_rows(const_matrix_ref x, const std::vector<std::int32_t>& rows) {
  matrix out(index_t(rows.size()), x.cols());
  for (std::size_t p = 0; p < rows.size(); ++p) out.row(index_t(p)) = x.row(rows[p]);
  return out;
}

/// target − the layer's compensation under `plan`: what its blocks must produce.
inline matrix block_target(const moe_layer& m, const runtime::routing_plan& plan, const matrix& target) {
  if (!m.compensation.active()) return target;
  matrix comp = matrix::Zero(target.rows(), target.cols());
  runtime::add_compensation(m, plan, comp);
  return target - comp;
}

/// Refits the down projections of every (non-novice) shared and routed
/// expert of `m` so that, with its routing and compensation fixed, the layer
/// reproduces `target` = dense(x) on x: one ridge regression for all of them,
/// minimising Σ_t ‖Σ_blocks W_b·h_b(x_t) − (target_t − comp_t)‖² + λ‖W − W₀‖².
/// The Gram matrix is assembled from block products over the tokens each pair
/// of blocks shares (a token touches only its selected experts).
inline void refit_down(moe_layer& m, const_matrix_ref x, const matrix& target, double ridge_factor) {
  const index_t hid = x.cols();
  const runtime::routing_plan plan = runtime::route(m, x);
  std::vector<refit_block> blocks = blocks_of(m, plan);
  const index_t nb = index_t(blocks.size());
  const index_t n = nb ? blocks.back().offset + blocks.back().weights->intermediate() : 0;
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t i = 0; i < nb; ++i) {
    auto& b = blocks[std::size_t(i)];
    b.h = neuron_activations(*b.weights, gather_rows(x, b.tokens));
    for (std::size_t p = 0; p < b.tokens.size(); ++p) b.h.row(index_t(p)) *= b.scale[p];
  }
  const matrix y = block_target(m, plan, target);
  // Gram blocks over shared tokens, and the right-hand side Φᵀ·y.
  std::vector<std::pair<index_t, index_t>> pairs;
  for (index_t a = 0; a < nb; ++a)
    for (index_t b = a; b < nb; ++b) pairs.emplace_back(a, b);
  dmatrix gram = dmatrix::Zero(n, n), rhs(n, hid);
#pragma omp parallel for schedule(dynamic, 1)
  for (std::ptrdiff_t q = 0; q < std::ptrdiff_t(pairs.size() + std::size_t(nb)); ++q) {
    if (q >= std::ptrdiff_t(pairs.size())) {
      const auto& b = blocks[std::size_t(q) - pairs.size()];
      rhs.middleRows(b.offset, b.h.cols()) = cross(b.h, gather_rows(y, b.tokens));
      continue;
    }
    const auto& ba = blocks[std::size_t(pairs[std::size_t(q)].first)];
    const auto& bb = blocks[std::size_t(pairs[std::size_t(q)].second)];
    // Rows of each block's activations at the tokens both blocks compute.
    std::vector<index_t> ra, rb;
    for (std::size_t i = 0, j = 0; i < ba.tokens.size() && j < bb.tokens.size();) {
      if (ba.tokens[i] < bb.tokens[j]) ++i;
      else if (bb.tokens[j] < ba.tokens[i]) ++j;
      else ra.push_back(index_t(i++)), rb.push_back(index_t(j++));
    }
    if (ra.empty()) continue;
    matrix ha(index_t(ra.size()), ba.h.cols()), hb(index_t(rb.size()), bb.h.cols());
    for (std::size_t p = 0; p < ra.size(); ++p) ha.row(index_t(p)) = ba.h.row(ra[p]), hb.row(index_t(p)) = bb.h.row(rb[p]);
    const dmatrix g = cross(ha, hb);
    gram.block(ba.offset, bb.offset, g.rows(), g.cols()) = g;
    if (&ba != &bb) gram.block(bb.offset, ba.offset, g.cols(), g.rows()) = g.transpose();
  }
  const double lambda = ridge_factor * gram.trace() / double(std::max<index_t>(n, 1)) + 1e-12;
  for (const auto& b : blocks)
    rhs.middleRows(b.offset, b.h.cols()) += lambda * b.weights->down.transpose().cast<double>();
  gram.diagonal().array() += lambda;
  Eigen::LLT<Eigen::Ref<dmatrix>> llt(gram);
  if (llt.info() != Eigen::Success) throw value_error("cmoe refit: the regularised Gram matrix is not positive definite");
  llt.solveInPlace(rhs);
  for (auto& b : blocks) b.weights->down = rhs.middleRows(b.offset, b.h.cols()).transpose().cast<float>();
}

/// Adam state of one weight matrix.
struct adam_slot {
  matrix m1, m2;
  void step(matrix& w, const matrix& g, double lr, index_t t) {
    constexpr float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
    if (m1.size() == 0) m1 = matrix::Zero(w.rows(), w.cols()), m2 = matrix::Zero(w.rows(), w.cols());
    m1 = b1 * m1 + (1 - b1) * g;
    m2 = b2 * m2 + (1 - b2) * g.cwiseProduct(g);
    const float c1 = float(1 - std::pow(double(b1), double(t))), c2 = float(1 - std::pow(double(b2), double(t)));
    w.array() -= float(lr) * (m1.array() / c1) / ((m2.array() / c2).sqrt() + eps);
  }
};

/// Layer-local distillation (fit_options::distill_steps): full-batch Adam on
/// every block's gate, up and down projections (SiLU-gated experts), routing
/// and compensation fixed, loss ‖Σ_blocks out_b − (target − comp)‖² / T.
/// The weights of the lowest loss seen are kept, the starting ones included:
/// Adam moves every weight by about its step size even when the residual is
/// rounding noise, so a layer that was exact (full activation after the
/// refit) would leave exactness, and a step that overflows (a NaN loss) is
/// never kept. Blocks run in parallel, each single-threaded, and their
/// outputs are summed in block order, so the result does not depend on the
/// thread count.
inline void distill(moe_layer& m, const_matrix_ref x, const matrix& target, index_t steps, double lr) {
  const runtime::routing_plan plan = runtime::route(m, x);
  std::vector<refit_block> blocks = blocks_of(m, plan);
  for (const auto& b : blocks)
    if (!b.weights->gated() || b.weights->act != activation::silu)
      throw config_error("cmoe distill: needs SiLU-gated experts");
  const index_t nb = index_t(blocks.size()), t = x.rows();
  const matrix y = block_target(m, plan, target);
  std::vector<matrix> xs(blocks.size()), outs(blocks.size());
  std::vector<adam_slot> state(3 * blocks.size());
  for (index_t i = 0; i < nb; ++i) xs[std::size_t(i)] = gather_rows(x, blocks[std::size_t(i)].tokens);
  const float grad_scale = 2.0f / float(std::max<index_t>(t, 1));
  double best_loss = std::numeric_limits<double>::infinity();
  std::vector<ffn> best(blocks.size());
  // Pass steps + 1 only measures the last step's weights.
  for (index_t step = 1; step <= steps + 1; ++step) {
#pragma omp parallel for schedule(dynamic, 1)
    for (index_t i = 0; i < nb; ++i) {
      const auto& b = blocks[std::size_t(i)];
      matrix o = neuron_activations(*b.weights, xs[std::size_t(i)]) * b.weights->down.transpose();
      for (std::size_t p = 0; p < b.tokens.size(); ++p) o.row(index_t(p)) *= b.scale[p];
      outs[std::size_t(i)] = std::move(o);
    }
    matrix r = -y;
    for (index_t i = 0; i < nb; ++i)
      for (std::size_t p = 0; p < blocks[std::size_t(i)].tokens.size(); ++p)
        r.row(blocks[std::size_t(i)].tokens[p]) += outs[std::size_t(i)].row(index_t(p));
    if (const double loss = r.cast<double>().squaredNorm(); loss < best_loss) {
      best_loss = loss;
      for (std::size_t i = 0; i < blocks.size(); ++i) best[i] = *blocks[i].weights;
    }
    if (step > steps) break;
#pragma omp parallel for schedule(dynamic, 1)
    for (index_t i = 0; i < nb; ++i) {
      auto& b = blocks[std::size_t(i)];
      ffn& f = *b.weights;
      const matrix& xb = xs[std::size_t(i)];
      matrix e = gather_rows(r, b.tokens);
      for (std::size_t p = 0; p < b.tokens.size(); ++p) e.row(index_t(p)) *= grad_scale * b.scale[p];
      const matrix a = xb * f.gate.transpose(), u = xb * f.up.transpose();
      matrix sa(a.rows(), a.cols()), h(a.rows(), a.cols()), da(a.rows(), a.cols()), du(a.rows(), a.cols());
      for (index_t p = 0; p < a.rows(); ++p)
        for (index_t j = 0; j < a.cols(); ++j) {
          const float sg = 1.0f / (1.0f + std::exp(-a(p, j)));
          sa(p, j) = a(p, j) * sg;
          h(p, j) = sa(p, j) * u(p, j);
        }
      const matrix dh = e * f.down;  // [n, w]
      for (index_t p = 0; p < a.rows(); ++p)
        for (index_t j = 0; j < a.cols(); ++j) {
          const float sg = 1.0f / (1.0f + std::exp(-a(p, j)));
          da(p, j) = dh(p, j) * u(p, j) * (sg * (1.0f + a(p, j) * (1.0f - sg)));
          du(p, j) = dh(p, j) * sa(p, j);
        }
      const matrix g_down = e.transpose() * h, g_gate = da.transpose() * xb, g_up = du.transpose() * xb;
      state[std::size_t(3 * i)].step(f.down, g_down, lr, step);
      state[std::size_t(3 * i + 1)].step(f.gate, g_gate, lr, step);
      state[std::size_t(3 * i + 2)].step(f.up, g_up, lr, step);
    }
  }
  if (best_loss < std::numeric_limits<double>::infinity())
    for (std::size_t i = 0; i < blocks.size(); ++i) *blocks[i].weights = std::move(best[i]);
}

}  // namespace detail

/// Turns `r` into the fitted scorer `o.router` (linear or quadratic) by
/// ridge regression of `scores` [T, E] (what each expert is worth to each
/// token) on the tokens x [T, H]. A quadratic router that already has a
/// projection keeps it (later rounds refit only the weights); otherwise P is
/// the top-`o.rank` principal directions of x. top_k and scale are kept.
inline void fit_router(router& r, const_matrix_ref x, const matrix& scores, const fit_options& o) {
  if (o.router == router_fit::analytic) throw config_error("cmoe fit_router: the analytic router is not fitted");
  if (scores.rows() != x.rows())
    throw shape_error(moeforge::detail::cat("cmoe fit_router: ", scores.rows(), " rows of scores for ", x.rows(), " tokens"));
  if (o.router == router_fit::quadratic && (o.rank < 1 || o.rank > x.cols()))
    throw config_error(moeforge::detail::cat("cmoe: rank = ", o.rank, ", expected 1..", x.cols(), " (the hidden size)"));
  using detail::dmatrix;
  detail::eigen_reproducible guard;
  const index_t h = x.cols(), t = x.rows();
  matrix quad;
  if (o.router == router_fit::quadratic) {
    if (r.kind != router_kind::quadratic_topk) detail::principal_projection(x, o.rank, r.projection, r.projection_bias);
    quad = runtime::quadratic_features(r.projection, r.projection_bias, x);
  } else {
    r.projection.resize(0, 0);
    r.projection_bias.resize(0);
  }
  matrix f(t, h + 1 + quad.cols());
  f.leftCols(h) = x;
  f.col(h).setOnes();
  if (quad.size()) f.rightCols(quad.cols()) = quad;
  const dmatrix w = detail::ridge(f, scores, o.router_ridge);  // [d, E]
  r.kind = o.router == router_fit::quadratic ? router_kind::quadratic_topk : router_kind::linear_topk;
  r.weight = w.topRows(h).transpose().cast<float>();
  r.weight_up.resize(0, 0);
  r.bias = w.row(h).transpose().cast<float>();
  if (quad.size())
    r.weight_quad = w.bottomRows(quad.cols()).transpose().cast<float>();
  else
    r.weight_quad.resize(0, 0);
}

/// Fits `m` (a CMoE layer converted from `dense`) on calibration inputs x
/// [T, H] as `o` asks; returns the calibration error after each step.
inline fit_report fit_layer(const ffn& dense, moe_layer& m, const_matrix_ref x, const fit_options& o) {
  validate(o);
  if (o.router == router_fit::quadratic && o.rank > x.cols())
    throw config_error(moeforge::detail::cat("cmoe: rank = ", o.rank, ", expected 1..", x.cols(), " (the hidden size)"));
  if (o.fits() && x.rows() == 0)
    throw config_error(moeforge::detail::cat("cmoe: router '", router_fit_name(o.router), "', compensate '", compensation_name(o.compensate),
                                             "' and refit '", refit_name(o.refit), "' need calibration inputs, got none"));
  fit_report rep;
  if (!o.fits()) return rep;
  detail::eigen_reproducible guard;
  rep.tokens = fit_tokens(o, dense.hidden(), dense.intermediate(), x.rows());
  const_matrix_ref xf = x.topRows(rep.tokens);
  index_t shared_width = 0;
  for (const auto& sh : m.shared) shared_width += sh.weights.intermediate();
  index_t computed = shared_width;  // neurons a token computes: the shared ones and the widest top-k routed experts
  {
    std::vector<index_t> widths;
    for (const auto& e : m.experts) widths.push_back(e.width());
    std::sort(widths.rbegin(), widths.rend());
    for (index_t j = 0; j < std::min<index_t>(m.router.top_k, index_t(widths.size())); ++j) computed += widths[std::size_t(j)];
  }
  index_t all_neurons = shared_width;
  for (const auto& e : m.experts) all_neurons += e.width();
  refit_mode refit = o.refit;
  if (o.size_rule && refit != refit_mode::none && all_neurons > size_rule_max_unknowns) {
    refit = refit_mode::none;
    rep.skipped.push_back(moeforge::detail::cat("refit ", refit_name(o.refit), ": ", all_neurons, " unknowns per output > ",
                                                size_rule_max_unknowns, " (size rule)"));
  }
  index_t distill_steps = o.distill_steps;
  if (o.size_rule && distill_steps > 0 &&
      double(distill_steps) * double(rep.tokens) * double(computed) * double(dense.hidden()) > size_rule_macs) {
    distill_steps = 0;
    rep.skipped.push_back(moeforge::detail::cat("distill: ", o.distill_steps, " steps x ", rep.tokens, " tokens x ", computed,
                                                " neurons x ", dense.hidden(), " > 2^36 multiply-adds (size rule)"));
  }
  auto since = std::chrono::steady_clock::now();
  const matrix target = runtime::dense_forward(dense, xf);
  auto record = [&](const std::string& step) {
    rep.errors.emplace_back(step, detail::relative_error(m, xf, target));
    const auto now = std::chrono::steady_clock::now();
    rep.seconds.push_back(std::chrono::duration<double>(now - since).count());
    since = now;
  };
  record("analytic");
  for (index_t round = 0; round < o.rounds; ++round) {
    const std::string suffix = round ? moeforge::detail::cat(" (round ", round + 1, ")") : std::string();
    matrix means, scores;
    detail::expert_outputs(m, xf, o.compensate == compensation_mode::novice, o.router != router_fit::analytic, means, scores);
    if (o.router != router_fit::analytic) {
      fit_router(m.router, xf, scores, o);
      m.compensation = {};
      record(std::string(router_fit_name(o.router)) + " router" + suffix);
    }
    if (o.compensate == compensation_mode::novice) {
      m.compensation.means = means;
      m.compensation.bias = means.colwise().sum().transpose();
      record("novice compensation" + suffix);
    }
    if (refit == refit_mode::down) {
      detail::refit_down(m, xf, target, o.refit_ridge);
      record("refit down" + suffix);
    }
  }
  if (distill_steps > 0) {
    detail::distill(m, xf, target, distill_steps, o.distill_lr);
    record("distill");
  }
  rep.router_macs = m.router.fitted_macs();
  validate(m, "cmoe fitted layer");
  return rep;
}

}  // namespace moeforge::convert
