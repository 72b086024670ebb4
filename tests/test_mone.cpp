// MoNE and its baselines: the novice, the statistics behind it, every
// method's choice against a direct computation, global scope, the saved
// model's size, bad input, and the same on stories260K converted by CMoE and
// on a Hugging Face Mixtral.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>

#include <omp.h>

#include "moeforge/calib/expert_stats.hpp"
#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/convert/cmoe.hpp"
#include "moeforge/convert/mone.hpp"
#include "moeforge/io/load.hpp"
#include "moeforge/io/native.hpp"
#include "moeforge/model/eval.hpp"
#include "moeforge/runtime/moe_ffn.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/stories.hpp"
#include "support/temp_dir.hpp"

using namespace moeforge;

namespace {

// The tokens the layer's router sends to expert e and their gate weights,
// computed in double from the scalar reference router.
struct mone_routed {
  std::vector<index_t> tokens;
  std::vector<double> gate;
};

mone_routed mone_route_direct(const moe_layer& m, const matrix& x, index_t e) {
  mone_routed out;
  for (index_t t = 0; t < x.rows(); ++t) {
    const auto p = reference::probs(m.router, x.row(t).data());
    const auto chosen = reference::top_k(p, m.router.top_k);
    double sum = 0;
    for (auto c : chosen) sum += p[std::size_t(c)];
    for (auto c : chosen) {
      if (c != e) continue;
      double g = m.router.kind == router_kind::softmax_topk ? p[std::size_t(c)] : 1.0;
      if (m.router.kind == router_kind::softmax_topk && m.router.renormalize) g /= sum;
      out.tokens.push_back(t);
      out.gate.push_back(g * m.router.scale);
    }
  }
  return out;
}

// Mean of f's output over the given tokens of x, in double.
Eigen::VectorXd mone_mean_over(const ffn& f, const matrix& x, const std::vector<index_t>& tokens) {
  Eigen::VectorXd mu = Eigen::VectorXd::Zero(f.hidden());
  for (index_t t : tokens) {
    const auto y = reference::ffn_token(f, x.row(t).data(), f.intermediate());
    for (index_t d = 0; d < f.hidden(); ++d) mu[d] += y[std::size_t(d)];
  }
  return tokens.empty() ? mu : Eigen::VectorXd(mu / double(tokens.size()));
}

// Mean of expert e's unweighted output over the tokens routed to it, in double.
Eigen::VectorXd mone_mean_direct(const moe_layer& m, const matrix& x, index_t e) {
  return mone_mean_over(m.experts[std::size_t(e)].weights, x, mone_route_direct(m, x, e).tokens);
}

convert::mone_options mone_opts(convert::mone_method method, index_t count) {
  convert::mone_options o;
  o.method = method;
  o.count = count;
  return o;
}

calib::layer_stats mone_stats(const moe_layer& m, const matrix& x, bool keep = false) {
  calib::expert_stats_options so;
  so.keep_outputs = keep;
  so.chunk = 64;  // several chunks per expert, so the Chan merges are exercised
  return calib::expert_statistics(m, x, so);
}

double mone_sq_diff(const matrix& a, const matrix& b) { return (a - b).cast<double>().squaredNorm(); }

// A random layer of the default experts over `hidden` features, routing each token to two.
moe_layer top2_layer(std::mt19937& rng, index_t hidden) {
  test::layer_spec spec;
  spec.hidden = hidden;
  moe_layer m = test::random_layer(spec, rng);
  m.router.top_k = 2;
  return m;
}

// Data bytes of every tensor in a native model directory.
std::size_t mone_tensor_bytes(const std::string& dir) {
  const io::safetensors_file st(dir + "/model.safetensors");
  std::size_t n = 0;
  for (const auto& t : st.tensors()) n += t.end - t.begin;
  return n;
}

}  // namespace

TEST_CASE("mone at ratio 0 changes nothing, for every method and replacement") {
  std::mt19937 rng(101);
  test::layer_spec spec;
  spec.shared = 1;
  spec.novices = {2};
  const moe_layer m = test::random_layer(spec, rng);
  const matrix x = test::random_matrix(300, spec.hidden, rng, 1.0f);
  const auto st = mone_stats(m, x, true);
  const matrix y = runtime::moe_forward(m, x);
  for (auto method : convert::all_mone_methods)
    for (auto rep : convert::all_prune_replacements) {
      if (method == convert::mone_method::search && rep == convert::prune_replacement::remove) continue;
      convert::mone_options o;
      o.method = method;
      o.replacement = rep;
      const auto res = convert::mone(m, st, o);
      INFO(convert::mone_method_name(method) << " " << convert::replacement_name(rep));
      REQUIRE(res.report.pruned.empty());
      REQUIRE(res.report.params_freed == 0);
      REQUIRE(parameter_count(res.layer) == parameter_count(m));
      REQUIRE(runtime::moe_forward(res.layer, x) == y);
    }
}

TEST_CASE("a novice outputs its slot's gate weight times the expert's mean output on the calibration tokens") {
  std::mt19937 rng(102);
  test::layer_spec spec;
  spec.hidden = 24;
  spec.widths = {9, 14, 6, 11, 8, 12};
  spec.shared = 1;
  moe_layer m = test::random_layer(spec, rng);
  m.router.top_k = 2;
  m.router.scale = 0.7f;  // the gate weight the model applies, not the router probability
  const matrix x = test::random_matrix(700, spec.hidden, rng, 1.0f);
  const auto st = mone_stats(m, x);
  const auto res = convert::mone(m, st, mone_opts(convert::mone_method::mone, 2));
  REQUIRE(res.report.pruned.size() == 2);
  moe_layer expected = m;  // the original with the pruned slots holding the direct means
  for (const auto& p : res.report.pruned) {
    const Eigen::VectorXd mu = mone_mean_direct(m, x, p.expert);
    const auto& slot = res.layer.experts[std::size_t(p.expert)];
    REQUIRE(slot.is_novice());
    REQUIRE(slot.weights.up.size() == 0);  // the weights are freed
    REQUIRE((slot.novice.cast<double>() - mu).cwiseAbs().maxCoeff() <= 1e-5 * (1.0 + mu.cwiseAbs().maxCoeff()));
    REQUIRE(p.routed == index_t(mone_route_direct(m, x, p.expert).tokens.size()));
    expected.experts[std::size_t(p.expert)].weights = ffn{};
    expected.experts[std::size_t(p.expert)].novice = mu.cast<float>();
  }
  REQUIRE(res.layer.router.weight == m.router.weight);  // router unchanged
  const matrix probe = test::random_matrix(50, spec.hidden, rng, 1.0f);
  const matrix want = reference::moe(expected, probe), got = runtime::moe_forward(res.layer, probe);
  REQUIRE((got - want).cwiseAbs().maxCoeff() <= 1e-4f * (1.0f + want.cwiseAbs().maxCoeff()));
}

TEST_CASE("a zero novice adds nothing to the tokens routed to its slot, which keep their other experts' gate weights") {
  std::mt19937 rng(103);
  moe_layer m = top2_layer(rng, 20);
  const matrix x = test::random_matrix(400, m.hidden(), rng, 1.0f);
  const auto res = convert::mone(m, mone_stats(m, x), mone_opts(convert::mone_method::zero, 2));
  std::vector<index_t> gone;
  for (const auto& p : res.report.pruned) {
    REQUIRE(res.layer.experts[std::size_t(p.expert)].is_novice());
    REQUIRE(res.layer.experts[std::size_t(p.expert)].novice.isZero(0.0f));
    gone.push_back(p.expert);
  }
  const matrix got = runtime::moe_forward(res.layer, x);
  for (index_t t = 0; t < x.rows(); ++t) {
    const auto p = reference::probs(m.router, x.row(t).data());
    const auto chosen = reference::top_k(p, 2);
    const double sum = p[std::size_t(chosen[0])] + p[std::size_t(chosen[1])];
    std::vector<index_t> experts, widths;
    std::vector<double> weights;
    for (auto c : chosen)
      if (std::find(gone.begin(), gone.end(), c) == gone.end()) {
        experts.push_back(c);
        weights.push_back(p[std::size_t(c)] / sum);
        widths.push_back(m.experts[std::size_t(c)].width());
      }
    const auto want = reference::moe_token(m, x.row(t).data(), experts, weights, widths);
    for (index_t d = 0; d < m.hidden(); ++d) REQUIRE(std::abs(got(t, d) - want[std::size_t(d)]) <= 1e-4 * (1.0 + std::abs(want[std::size_t(d)])));
  }
}

TEST_CASE("expert statistics: Welford/Chan moments equal a two-pass double computation and are bit-identical for 1 and 2 threads") {
  std::mt19937 rng(104);
  test::layer_spec spec;
  spec.hidden = 16;
  spec.novices = {4};
  moe_layer m = test::random_layer(spec, rng);
  m.router.top_k = 2;
  const matrix x = test::random_matrix(3000, spec.hidden, rng, 1.0f);
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto one = mone_stats(m, x, true);
  omp_set_num_threads(2);
  const auto two = mone_stats(m, x, true);
  omp_set_num_threads(threads);
  index_t routed = 0;
  for (index_t e = 0; e < m.num_experts(); ++e) {
    INFO("expert " << e);
    const auto& s = one.experts[std::size_t(e)];
    const auto& s2 = two.experts[std::size_t(e)];
    routed += s.routed;
    // Bit-identical whatever the thread count.
    REQUIRE(s.routed == s2.routed);
    REQUIRE(s.mass == s2.mass);
    REQUIRE(s.reap == s2.reap);
    REQUIRE(s.output.mean == s2.output.mean);
    REQUIRE(s.output.m2 == s2.output.m2);
    if (m.experts[std::size_t(e)].is_novice()) {
      REQUIRE(s.output.count == 0);
      continue;
    }
    REQUIRE(s.routed > 3 * 64);  // several chunks merged
    REQUIRE(s.output.count == s.routed);
    // The kept outputs are the expert's outputs ...
    for (index_t p = 0; p < s.routed; p += 97) {
      const auto& f = m.experts[std::size_t(e)].weights;
      const auto y = reference::ffn_token(f, x.row(s.tokens[std::size_t(p)]).data(), f.intermediate());
      for (index_t d = 0; d < m.hidden(); ++d) REQUIRE(std::abs(s.outputs(p, d) - y[std::size_t(d)]) <= 1e-4 * (1.0 + std::abs(y[std::size_t(d)])));
    }
    // ... and the moments those of a two-pass computation over them in double.
    const Eigen::MatrixXd o = s.outputs.cast<double>();
    const Eigen::VectorXd mean = o.colwise().mean().transpose();
    const Eigen::VectorXd var = (o.rowwise() - mean.transpose()).array().square().colwise().sum().transpose() / double(o.rows());
    REQUIRE((s.output.mean - mean).cwiseAbs().maxCoeff() <= 1e-12 * (1.0 + mean.cwiseAbs().maxCoeff()));
    REQUIRE((s.output.variance() - var).cwiseAbs().maxCoeff() <= 1e-10 * (1.0 + var.cwiseAbs().maxCoeff()));
    REQUIRE(s.output_spread() == Approx(std::sqrt(var.sum())).epsilon(1e-10));
  }
  REQUIRE(routed == 3000 * 2);
}

TEST_CASE("expert statistics: an expert whose output is the same on every token has variance exactly 0") {
  // Every calibration token the same: each routed expert computes one output
  // again and again, its var is 0 and its MoNE score 0 (ties to the lower
  // index). Merging the 256-token chunks must not make a spread of rounding
  // out of a mean recomputed as a weighted sum of equal means.
  std::mt19937 rng(5);
  moe_layer m = top2_layer(rng, 16);
  const matrix token = test::random_matrix(1, m.hidden(), rng, 1.0f);
  for (index_t n = 257; n < 1400; n += 11) {
    const matrix x = token.replicate(n, 1);
    const auto st = calib::expert_statistics(m, x);
    for (index_t e = 0; e < m.num_experts(); ++e) {
      const auto& s = st.experts[std::size_t(e)];
      if (s.routed == 0) continue;
      INFO(n << " tokens, expert " << e);
      REQUIRE(s.routed == n);
      REQUIRE(s.output.m2.cwiseAbs().maxCoeff() == 0.0);
      REQUIRE(s.output_spread() == 0.0);
    }
  }
}

TEST_CASE("frequency pruning removes the expert and its router row, and the softmax renormalises over the experts left") {
  // H = 1, three ungated ReLU experts with outputs 10·relu(−x), 100·relu(x), 1000·relu(x);
  // router logits (0, ln 2, ln 3)·x, top-1, gate weight = the probability itself.
  moe_layer m;
  m.router.kind = router_kind::softmax_topk;
  m.router.top_k = 1;
  m.router.renormalize = false;
  m.router.weight.resize(3, 1);
  m.router.weight << 0.0f, std::log(2.0f), std::log(3.0f);
  m.router.drop.kind = drop_kind::one_t;  // threshold 0: drops nothing, carries per-expert factors
  m.router.drop.expert_factor = {0.5f, 0.6f, 0.7f};
  for (float v : {10.0f, 100.0f, 1000.0f}) {
    routed_expert e;
    e.weights.act = activation::relu;
    e.weights.up = matrix::Constant(1, 1, v == 10.0f ? -1.0f : 1.0f);
    e.weights.down = matrix::Constant(1, 1, v);
    m.experts.push_back(std::move(e));
  }
  // x = 1 and 2 route to expert 2, x = −1 to expert 0: expert 1 is never chosen.
  matrix calib(3, 1);
  calib << 1.0f, 2.0f, -1.0f;
  const auto st = mone_stats(m, calib);
  REQUIRE(st.experts[1].routed == 0);
  const auto res = convert::mone(m, st, mone_opts(convert::mone_method::frequency, 1));
  REQUIRE(res.report.replacement == "remove");
  REQUIRE(res.report.pruned.size() == 1);
  REQUIRE(res.report.pruned[0].expert == 1);
  REQUIRE(*res.report.pruned[0].score == 0.0);
  REQUIRE(res.report.kept == std::vector<index_t>{0, 2});
  const moe_layer& k = res.layer;
  REQUIRE(k.num_experts() == 2);
  REQUIRE(k.router.weight.rows() == 2);
  REQUIRE(k.router.weight(0, 0) == 0.0f);
  REQUIRE(k.router.weight(1, 0) == std::log(3.0f));
  REQUIRE(k.router.drop.expert_factor == std::vector<float>{0.5f, 0.7f});
  REQUIRE(res.report.params_freed == 3);  // up, down and the router row
  REQUIRE(res.report.bytes_freed == 12);
  // Before: p = (1, 2, 3)/6 at x = 1. After: p = (1, 3)/4, so expert 2 gets 3/4.
  matrix x(3, 1);
  x << 1.0f, 2.0f, -1.0f;
  const matrix before = runtime::moe_forward(m, x), after = runtime::moe_forward(k, x);
  REQUIRE(before(0, 0) == Approx(1000.0 * 3.0 / 6.0));
  REQUIRE(after(0, 0) == Approx(1000.0 * 3.0 / 4.0));
  REQUIRE(after(1, 0) == Approx(2000.0 * 9.0 / 10.0));  // logits (0, 2 ln 3): p = (1, 9)/10
  REQUIRE(before(2, 0) == Approx(10.0 * 6.0 / 11.0));   // logits (0, −ln 2, −ln 3): p₀ = 1/(1 + 1/2 + 1/3)
  REQUIRE(after(2, 0) == Approx(10.0 * 3.0 / 4.0));     // logits (0, −ln 3): p₀ = 1/(1 + 1/3)

  SECTION("top_k is clamped to the experts left, and the report says so") {
    moe_layer all = m;
    all.router.top_k = 3;
    const auto r = convert::mone(all, mone_stats(all, calib), mone_opts(convert::mone_method::frequency, 1));
    REQUIRE(r.report.top_k_before == 3);
    REQUIRE(r.report.top_k_after == 2);
    REQUIRE(r.layer.router.top_k == 2);
  }
  SECTION("the analytic router loses both of its rows") {
    std::mt19937 rng(105);
    test::layer_spec spec;
    spec.kind = router_kind::cmoe_analytic;
    const moe_layer a = test::random_layer(spec, rng);
    const matrix xa = test::random_matrix(200, spec.hidden, rng, 1.0f);
    const auto r = convert::mone(a, mone_stats(a, xa), mone_opts(convert::mone_method::frequency, 2));
    REQUIRE(r.layer.router.weight.rows() == 3);
    REQUIRE(r.layer.router.weight_up.rows() == 3);
    for (std::size_t j = 0; j < 3; ++j) {
      REQUIRE(r.layer.router.weight.row(index_t(j)) == a.router.weight.row(r.report.kept[j]));
      REQUIRE(r.layer.router.weight_up.row(index_t(j)) == a.router.weight_up.row(r.report.kept[j]));
    }
    index_t freed = 2 * 2 * spec.hidden;  // two rows of G and of U
    for (const auto& p : r.report.pruned) freed += parameter_count(a.experts[std::size_t(p.expert)].weights);
    REQUIRE(r.report.params_freed == freed);
  }
  SECTION("a fitted router's bias and quadratic rows and the compensation's means go with their experts") {
    // (The pruned layer was refused by validation, leaving the model's layer emptied, before they did.)
    std::mt19937 rng(106);
    test::layer_spec spec;
    spec.shared = 1;
    moe_layer a = test::random_layer(spec, rng);
    const index_t e_count = a.num_experts(), h = spec.hidden, rank = 3;
    a.router.kind = router_kind::quadratic_topk;
    a.router.top_k = 2;
    a.router.bias = test::random_matrix(e_count, 1, rng, 0.3f);
    a.router.projection = test::random_matrix(rank, h, rng, 0.3f);
    a.router.projection_bias = test::random_matrix(rank, 1, rng, 0.3f);
    a.router.weight_quad = test::random_matrix(e_count, rank * (rank + 1) / 2, rng, 0.3f);
    a.compensation.means = test::random_matrix(e_count, h, rng, 0.5f);
    a.compensation.bias = a.compensation.means.colwise().sum().transpose();
    const matrix xa = test::random_matrix(200, h, rng, 1.0f);
    const auto r = convert::mone(a, mone_stats(a, xa), mone_opts(convert::mone_method::frequency, 2));
    const auto& kept = r.report.kept;
    REQUIRE(kept.size() == 3);
    // The same layer as if the pruned experts had never been there, built by hand.
    moe_layer never = a;
    never.experts.clear();
    for (matrix* t : {&never.router.weight, &never.router.weight_quad, &never.compensation.means}) t->resize(3, t->cols());
    never.router.bias.resize(3);
    for (std::size_t j = 0; j < 3; ++j) {
      const index_t e = kept[j];
      never.experts.push_back(a.experts[std::size_t(e)]);
      never.router.weight.row(index_t(j)) = a.router.weight.row(e);
      never.router.weight_quad.row(index_t(j)) = a.router.weight_quad.row(e);
      never.router.bias[index_t(j)] = a.router.bias[e];
      never.compensation.means.row(index_t(j)) = a.compensation.means.row(e);
    }
    never.compensation.bias = never.compensation.means.colwise().sum().transpose();
    REQUIRE(r.layer.router.weight == never.router.weight);
    REQUIRE(r.layer.router.weight_quad == never.router.weight_quad);
    REQUIRE(r.layer.router.bias == never.router.bias);
    REQUIRE(r.layer.compensation.means == never.compensation.means);
    REQUIRE(r.layer.compensation.bias.isApprox(never.compensation.bias, 1e-5f));
    const matrix got = runtime::moe_forward(r.layer, xa), want = runtime::moe_forward(never, xa);
    REQUIRE((got - want).cwiseAbs().maxCoeff() < 1e-4f);
  }
}

TEST_CASE("MoNE scores are the output spread times the routing mass (over all tokens or the routed ones), and the lowest are pruned") {
  std::mt19937 rng(107);
  test::layer_spec spec;
  spec.hidden = 18;
  spec.widths = {13, 20, 7, 31, 16, 9};
  moe_layer m = test::random_layer(spec, rng);
  m.router.top_k = 2;
  m.router.scale = 0.8f;
  const matrix x = test::random_matrix(500, spec.hidden, rng, 1.0f);
  const auto st = mone_stats(m, x);
  // Per expert, in double from the scalar reference: the gate-weight mass
  // and sqrt(Σ_d population variance of the unweighted output).
  std::vector<double> mass, routed, spread;
  for (index_t e = 0; e < m.num_experts(); ++e) {
    const auto r = mone_route_direct(m, x, e);
    const ffn& f = m.experts[std::size_t(e)].weights;
    double g = 0;
    for (double v : r.gate) g += v;
    const Eigen::VectorXd mu = mone_mean_over(f, x, r.tokens);
    Eigen::VectorXd var = Eigen::VectorXd::Zero(f.hidden());
    for (index_t t : r.tokens) {
      const auto y = reference::ffn_token(f, x.row(t).data(), f.intermediate());
      for (index_t d = 0; d < f.hidden(); ++d) var[d] += (y[std::size_t(d)] - mu[d]) * (y[std::size_t(d)] - mu[d]);
    }
    mass.push_back(g);
    routed.push_back(double(r.tokens.size()));
    spread.push_back(r.tokens.empty() ? 0.0 : std::sqrt(var.sum() / double(r.tokens.size())));
  }
  for (auto form : convert::all_freq_forms) {
    convert::mone_options o = mone_opts(convert::mone_method::mone, 2);
    o.freq = form;
    const auto scores = convert::expert_scores(m, st, o);
    std::vector<std::pair<double, index_t>> direct;
    for (index_t e = 0; e < m.num_experts(); ++e) {
      const std::size_t i = std::size_t(e);
      const double freq = mass[i] / (form == convert::freq_form::all ? double(x.rows()) : routed[i]);
      const double want = spread[i] * freq;
      INFO(convert::freq_form_name(form) << " expert " << e);
      REQUIRE(*scores[i] == Approx(want).epsilon(1e-5));
      direct.push_back({want, e});
    }
    std::sort(direct.begin(), direct.end());
    const auto res = convert::mone(m, st, o);
    REQUIRE(res.report.pruned.size() == 2);
    CHECK(res.report.pruned[0].expert == direct[0].second);
    CHECK(res.report.pruned[1].expert == direct[1].second);
  }
}

TEST_CASE("REAP scores are the mean over routed tokens of gate weight times output norm, and the lowest are pruned") {
  std::mt19937 rng(106);
  moe_layer m = top2_layer(rng, 18);
  const matrix x = test::random_matrix(500, m.hidden(), rng, 1.0f);
  const auto st = mone_stats(m, x);
  convert::mone_options o = mone_opts(convert::mone_method::reap, 2);
  const auto scores = convert::expert_scores(m, st, o);
  std::vector<std::pair<double, index_t>> direct;
  for (index_t e = 0; e < m.num_experts(); ++e) {
    const auto r = mone_route_direct(m, x, e);
    const ffn& f = m.experts[std::size_t(e)].weights;
    double sum = 0;
    for (std::size_t i = 0; i < r.tokens.size(); ++i) {
      const auto y = reference::ffn_token(f, x.row(r.tokens[i]).data(), f.intermediate());
      double n2 = 0;
      for (double v : y) n2 += v * v;
      sum += r.gate[i] * std::sqrt(n2);
    }
    const double want = sum / double(r.tokens.size());
    INFO("expert " << e);
    REQUIRE(*scores[std::size_t(e)] == Approx(want).epsilon(1e-5));
    direct.push_back({want, e});
  }
  std::sort(direct.begin(), direct.end());
  const auto res = convert::mone(m, st, o);
  REQUIRE(res.report.pruned[0].expert == direct[0].second);
  REQUIRE(res.report.pruned[1].expert == direct[1].second);
  REQUIRE(res.layer.num_experts() == 3);  // REAP removes, as its paper does
}

TEST_CASE("expert scores refuse the options mone refuses: no search error is priced for removing an expert") {
  // The search prices replacements that keep the routing; removing a router
  // row changes it, so a search score under `remove` would be the zero
  // novice's error under another name. mone and prune_experts refuse it.
  std::mt19937 rng(111);
  test::layer_spec spec;
  spec.hidden = 12;
  const moe_layer m = test::random_layer(spec, rng);
  const auto st = mone_stats(m, test::random_matrix(100, spec.hidden, rng, 1.0f), true);
  convert::mone_options o = mone_opts(convert::mone_method::search, 1);
  o.replacement = convert::prune_replacement::remove;
  REQUIRE_THROWS_WITH(convert::mone(m, st, o), Catch::Contains("search with replacement remove"));
  REQUIRE_THROWS_WITH(convert::expert_scores(m, st, o), Catch::Contains("search with replacement remove"));
  o.replacement = convert::prune_replacement::zero;
  REQUIRE(convert::expert_scores(m, st, o).size() == 5);
}

TEST_CASE("the output-error search finds the subset whose replacement changes the layer's output least (brute force)") {
  std::mt19937 rng(107);
  test::layer_spec spec;
  spec.hidden = 12;
  spec.widths = {5, 9, 4, 7, 6, 8};
  moe_layer m = test::random_layer(spec, rng);
  m.router.top_k = 3;  // experts share many tokens: the cross terms of the error matter
  const matrix x = test::random_matrix(400, spec.hidden, rng, 1.0f);
  const auto st = mone_stats(m, x, true);
  const matrix y = runtime::moe_forward(m, x);
  for (auto rep : {convert::prune_replacement::novice, convert::prune_replacement::zero})
    for (index_t r : {1, 2, 3}) {
      convert::mone_options o = mone_opts(convert::mone_method::search, r);
      o.replacement = rep;
      const auto res = convert::mone(m, st, o);
      INFO(convert::replacement_name(rep) << ", r = " << r);
      REQUIRE(res.report.search == "exhaustive");
      // The true error of every r-subset, running the pruned layer.
      double best = std::numeric_limits<double>::infinity();
      std::vector<index_t> best_set;
      for (unsigned mask = 0; mask < 64u; ++mask) {
        if (index_t(__builtin_popcount(mask)) != r) continue;
        std::vector<index_t> set;
        for (index_t e = 0; e < 6; ++e)
          if (mask >> e & 1u) set.push_back(e);
        convert::mone_options fixed = o;
        const double err = mone_sq_diff(runtime::moe_forward(convert::prune_experts(m, st, set, fixed).layer, x), y);
        if (err < best) best = err, best_set = set;
      }
      std::vector<index_t> chosen;
      for (const auto& p : res.report.pruned) chosen.push_back(p.expert);
      std::sort(chosen.begin(), chosen.end());
      REQUIRE(chosen == best_set);
      REQUIRE(*res.report.calibration_error == Approx(best).epsilon(1e-4));
    }
  SECTION("beyond 10^4 subsets the search is greedy, and its reported error is the true one") {
    test::layer_spec wide;
    wide.hidden = 8;
    wide.widths.assign(20, 3);
    moe_layer w = test::random_layer(wide, rng);
    w.router.top_k = 4;
    const matrix xw = test::random_matrix(300, wide.hidden, rng, 1.0f);
    const auto sw = mone_stats(w, xw, true);
    const auto res = convert::mone(w, sw, mone_opts(convert::mone_method::search, 8));  // C(20, 8) = 125970
    REQUIRE(res.report.search == "greedy");
    REQUIRE(res.report.pruned.size() == 8);
    const double err = mone_sq_diff(runtime::moe_forward(res.layer, xw), runtime::moe_forward(w, xw));
    REQUIRE(*res.report.calibration_error == Approx(err).epsilon(1e-4));
    // No single expert, replaced alone, beats the greedy's first pick.
    const auto solo = convert::expert_scores(w, sw, mone_opts(convert::mone_method::search, 8));
    for (const auto& s : solo) REQUIRE(*s >= *solo[std::size_t(res.report.pruned[0].expert)]);
  }
}

TEST_CASE("global scope ranks experts across layers and keeps at least one real expert in every layer") {
  std::mt19937 rng(108);
  test::layer_spec spec;
  spec.hidden = 10;
  model::weights w;
  w.config.dim = spec.hidden;
  for (int l = 0; l < 4; ++l) {
    model::layer layer;
    if (l == 1) {
      layer.ffn = test::random_ffn(spec.hidden, 12, rng);  // a dense layer the driver skips
    } else {
      moe_layer m = test::random_layer(spec, rng);
      m.router.top_k = 2;
      if (l == 0)  // layer 0's outputs are tiny: all its experts rank below every other layer's
        for (auto& e : m.experts) e.weights.down *= 1e-3f;
      layer.ffn = std::move(m);
    }
    w.layers.push_back(std::move(layer));
  }
  const matrix x = test::random_matrix(200, spec.hidden, rng, 1.0f);
  auto inputs = [&](const model::weights&, index_t) { return x; };
  auto real_left = [](const model::weights& m, std::size_t l) {
    return convert::detail::real_experts(std::get<moe_layer>(m.layers[l].ffn)).size();
  };
  convert::mone_options o;
  o.scope = convert::mone_scope::global;

  SECTION("the lowest scores go first, but never a layer's last real expert") {
    o.count = 6;  // layer 0 can give only 4 of its 5
    model::weights p = w;
    const auto rep = convert::mone_model(p, inputs, o);
    REQUIRE(rep.inputs == "unpruned");
    REQUIRE(rep.layers.size() == 3);
    REQUIRE(rep.experts_pruned == 6);
    REQUIRE(real_left(p, 0) == 1);
    REQUIRE(rep.layers[0].pruned.size() == 4);
    // The other two are the lowest-scoring experts of layers 2 and 3 together.
    std::vector<double> others;
    for (std::size_t i = 1; i < 3; ++i)
      for (const auto& s : rep.layers[i].scores) others.push_back(*s);
    std::sort(others.begin(), others.end());
    std::vector<double> taken;
    for (std::size_t i = 1; i < 3; ++i)
      for (const auto& q : rep.layers[i].pruned) taken.push_back(*q.score);
    std::sort(taken.begin(), taken.end());
    REQUIRE(taken == std::vector<double>(others.begin(), others.begin() + 2));
  }
  SECTION("every method, up to the most global scope can prune") {
    for (auto method : {convert::mone_method::mone, convert::mone_method::frequency, convert::mone_method::reap, convert::mone_method::random}) {
      o.method = method;
      o.count = 12;  // 3 layers × (5 − 1)
      model::weights p = w;
      const auto rep = convert::mone_model(p, inputs, o);
      INFO(convert::mone_method_name(method));
      REQUIRE(rep.experts_pruned == 12);
      for (std::size_t l : {0, 2, 3}) REQUIRE(real_left(p, l) == 1);
      o.count = 13;
      model::weights q = w;
      REQUIRE_THROWS_WITH(convert::mone_model(q, inputs, o), Catch::Contains("count = 13") && Catch::Contains("at most 12"));
    }
  }
}

TEST_CASE("layer-sequential statistics come from the model pruned so far, unpruned ones from the original") {
  std::mt19937 rng(109);
  test::layer_spec spec;
  spec.hidden = 10;
  model::weights w;
  w.config.dim = spec.hidden;
  for (int l = 0; l < 2; ++l) {
    model::layer layer;
    layer.ffn = test::random_layer(spec, rng);
    w.layers.push_back(std::move(layer));
  }
  const matrix x = test::random_matrix(100, spec.hidden, rng, 1.0f);
  for (bool sequential : {true, false}) {
    std::vector<index_t> novices_seen;  // novices in layer 0 when layer 1 calibrates
    auto inputs = [&](const model::weights& m, index_t l) {
      if (l == 1) {
        const auto& first = std::get<moe_layer>(m.layers[0].ffn);
        novices_seen.push_back(first.num_experts() - index_t(convert::detail::real_experts(first).size()));
      }
      return x;
    };
    convert::mone_options o = mone_opts(convert::mone_method::mone, 2);
    o.sequential = sequential;
    model::weights p = w;
    const auto rep = convert::mone_model(p, inputs, o);
    REQUIRE(rep.inputs == (sequential ? "sequential" : "unpruned"));
    REQUIRE(novices_seen == std::vector<index_t>{sequential ? 2 : 0});
    REQUIRE(rep.experts_pruned == 4);
  }
}

TEST_CASE("mone rejects bad input with a typed error naming the option and leaves the model untouched") {
  std::mt19937 rng(110);
  test::layer_spec spec;
  spec.hidden = 10;
  model::weights w;
  w.config.dim = spec.hidden;
  model::layer layer;
  layer.ffn = test::random_layer(spec, rng);
  w.layers.push_back(std::move(layer));
  const matrix x = test::random_matrix(50, spec.hidden, rng, 1.0f);
  auto inputs = [&](const model::weights&, index_t) { return x; };
  const index_t params = parameter_count(std::get<moe_layer>(w.layers[0].ffn));
  auto untouched = [&] {
    const auto& m = std::get<moe_layer>(w.layers[0].ffn);
    REQUIRE(parameter_count(m) == params);
    REQUIRE(convert::detail::real_experts(m).size() == 5);
  };
  convert::mone_options o;
  for (double bad : {1.0, -0.1, 1.5, std::nan("")}) {
    o.ratio = bad;
    INFO("ratio " << bad);
    REQUIRE_THROWS_AS(convert::mone_model(w, inputs, o), config_error);
    REQUIRE_THROWS_WITH(convert::mone_model(w, inputs, o), Catch::Contains("ratio") && Catch::Contains("[0, 1)"));
    untouched();
  }
  o = mone_opts(convert::mone_method::mone, 5);
  REQUIRE_THROWS_WITH(convert::mone_model(w, inputs, o), Catch::Contains("count = 5") && Catch::Contains("every real expert of layer 0"));
  o.ratio = 0.96;  // rounds to all 5 experts
  o.count.reset();
  REQUIRE_THROWS_WITH(convert::mone_model(w, inputs, o), Catch::Contains("ratio = 0.96") && Catch::Contains("every real expert"));
  o = mone_opts(convert::mone_method::mone, -1);
  REQUIRE_THROWS_WITH(convert::mone_model(w, inputs, o), Catch::Contains("count = -1"));
  o = mone_opts(convert::mone_method::search, 1);
  o.replacement = convert::prune_replacement::remove;
  REQUIRE_THROWS_WITH(convert::mone_model(w, inputs, o), Catch::Contains("search with replacement remove"));
  o = mone_opts(convert::mone_method::search, 1);
  o.scope = convert::mone_scope::global;
  REQUIRE_THROWS_WITH(convert::mone_model(w, inputs, o), Catch::Contains("search with scope global"));
  untouched();
  // Empty calibration: no tokens reach the statistics.
  o = mone_opts(convert::mone_method::mone, 1);
  REQUIRE_THROWS_WITH(convert::mone_model(w, [&](const model::weights&, index_t) { return matrix(0, spec.hidden); }, o),
                      Catch::Contains("zero calibration tokens"));
  untouched();
  // Unknown names.
  REQUIRE_THROWS_WITH(convert::parse_mone_method("magnitude"), Catch::Contains("mone method 'magnitude'") && Catch::Contains("search"));
  REQUIRE_THROWS_AS(convert::parse_mone_scope("model"), config_error);
  REQUIRE_THROWS_AS(convert::parse_freq_form("tokens"), config_error);
  REQUIRE_THROWS_AS(convert::parse_replacement("drop"), config_error);
  for (auto m : convert::all_mone_methods) REQUIRE(convert::parse_mone_method(convert::mone_method_name(m)) == m);
  // A dense model.
  model::weights dense;
  dense.config.dim = spec.hidden;
  model::layer d;
  d.ffn = test::random_ffn(spec.hidden, 8, rng);
  dense.layers.push_back(std::move(d));
  REQUIRE_THROWS_WITH(convert::mone_model(dense, inputs, convert::mone_options{}),
                      Catch::Contains("convert it first with `moeforge convert cmoe`"));
  // Already-novice slots are not candidates.
  moe_layer m = std::get<moe_layer>(w.layers[0].ffn);
  m.experts[0].weights = ffn{};
  m.experts[0].novice = vector::Ones(spec.hidden);
  REQUIRE_THROWS_WITH(convert::prune_experts(m, mone_stats(m, x), {0}, convert::mone_options{}), Catch::Contains("already a novice"));
  const auto res = convert::mone(m, mone_stats(m, x), mone_opts(convert::mone_method::mone, 3));
  for (const auto& p : res.report.pruned) REQUIRE(p.expert != 0);
  REQUIRE(res.layer.experts[0].novice == vector::Ones(spec.hidden));
  REQUIRE_THROWS_WITH(convert::mone(m, mone_stats(m, x), mone_opts(convert::mone_method::mone, 4)), Catch::Contains("which has 4"));
}

// ---------------------------------------------------------------------------
// stories260K converted by CMoE in the test.

namespace {

struct mone_stories {
  model::weights w = test::stories_weights();
  std::vector<std::vector<std::int32_t>> calib = calib::calibration_windows(test::stories_text("tinystories_calib.txt"), 512, 2048);
  convert::ffn_inputs_fn inputs = [this](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, calib); };

  explicit mone_stories(const char* config) {
    convert::cmoe_options o;
    o.config = convert::parse_cmoe_config(config);
    convert::cmoe_model(w, inputs, o);
  }
};

}  // namespace

TEST_CASE("stories260K: ratio 0 keeps the logits; a novice is the mean output of the expert on layer 0's calibration inputs") {
  const mone_stories s("S1A3E8");
  const auto tokens = test::stories_text("tinystories_eval.txt");
  const std::vector<std::int32_t> head(tokens.begin(), tokens.begin() + 200);
  const matrix before = test::logits(s.w, head);
  model::weights same = s.w;
  const auto rep0 = convert::mone_model(same, s.inputs, convert::mone_options{});
  REQUIRE(rep0.experts_pruned == 0);
  REQUIRE(test::logits(same, head) == before);

  model::weights p = s.w;
  convert::mone_options o;
  o.ratio = 0.25;  // round(0.25 · 7) = 2 per layer
  const auto rep = convert::mone_model(p, s.inputs, o);
  REQUIRE(rep.inputs == "sequential");
  REQUIRE(rep.layers.size() == 5);
  REQUIRE(rep.experts_pruned == 10);
  const auto& original = std::get<moe_layer>(s.w.layers[0].ffn);
  const matrix x0 = s.inputs(s.w, 0);
  // Which tokens an expert gets is the float router's discrete choice, the
  // one the model runs and MoNE measures. Redone in double, a token whose
  // k-th and (k+1)-th probabilities tie to float rounding may change sides
  // (it does under clang), moving the mean by that token's whole share
  // (~1e-4), which no rounding tolerance should absorb. So the double mean is
  // taken over the float router's tokens, and the double routing must agree
  // with them on every token but such near-ties.
  const runtime::selection sel = runtime::select_topk(original.router, runtime::router_probs(original.router, x0));
  const index_t k = original.router.top_k;
  for (index_t t = 0; t < x0.rows(); ++t) {
    auto p = reference::probs(original.router, x0.row(t).data());
    auto direct = reference::top_k(p, k);
    std::vector<index_t> chosen(sel.expert.begin() + t * k, sel.expert.begin() + (t + 1) * k);
    std::sort(direct.begin(), direct.end());
    std::sort(chosen.begin(), chosen.end());
    if (chosen == direct) continue;
    std::sort(p.begin(), p.end(), std::greater<>());
    INFO("token " << t << ": probabilities " << p[std::size_t(k - 1)] << " and " << p[std::size_t(k)]);
    REQUIRE(p[std::size_t(k - 1)] - p[std::size_t(k)] <= 1e-5 * p[std::size_t(k - 1)]);
  }
  for (const auto& q : rep.layers[0].pruned) {
    std::vector<index_t> routed;
    for (index_t t = 0; t < x0.rows(); ++t)
      if (std::count(sel.expert.begin() + t * k, sel.expert.begin() + (t + 1) * k, q.expert)) routed.push_back(t);
    REQUIRE(index_t(routed.size()) == q.routed);
    const Eigen::VectorXd mu = mone_mean_over(original.experts[std::size_t(q.expert)].weights, x0, routed);
    const vector& novice = std::get<moe_layer>(p.layers[0].ffn).experts[std::size_t(q.expert)].novice;
    REQUIRE((novice.cast<double>() - mu).cwiseAbs().maxCoeff() <= 1e-5 * (1.0 + mu.cwiseAbs().maxCoeff()));
  }
  const auto eval = test::stories_text("tinystories_eval.txt");
  const double ppl0 = model::perplexity(model::transformer(s.w), eval, 512, 2).ppl;
  const double ppl = model::perplexity(model::transformer(p), eval, 512, 2).ppl;
  REQUIRE(std::isfinite(ppl));
  REQUIRE(ppl > ppl0);  // pruning costs something
}

TEST_CASE("stories260K: the pruned model is smaller on disk by exactly the reported bytes and reloads to identical outputs", "[slow]") {
  const mone_stories s("S2A2E16");
  test::temp_dir tmp;
  io::save_native(s.w, tmp / "unpruned");
  const std::size_t full = mone_tensor_bytes(tmp / "unpruned");
  const std::vector<std::int32_t> tokens{1, 403, 407, 261, 378, 285, 429, 32, 90, 310};
  for (auto method : {convert::mone_method::mone, convert::mone_method::frequency}) {
    model::weights p = s.w;
    convert::mone_options o;
    o.method = method;
    o.ratio = 0.5;
    const auto rep = convert::mone_model(p, s.inputs, o);
    INFO(convert::mone_method_name(method));
    REQUIRE(rep.experts_pruned == 5 * 7);
    const std::string dir = tmp / std::string(convert::mone_method_name(method));
    io::save_native(p, dir, convert::to_json(rep));
    REQUIRE(full - mone_tensor_bytes(dir) == std::size_t(rep.bytes_freed));
    REQUIRE(rep.bytes_freed == rep.params_freed * 4);
    const model::weights back = io::load_native(dir);
    REQUIRE(test::logits(back, tokens) == test::logits(p, tokens));
    REQUIRE(io::read_native_manifest(dir)["provenance"]["experts_pruned"] == 35);
  }
}

TEST_CASE("a Hugging Face Mixtral is pruned by every method, saved and reloaded to identical outputs") {
  io::load_options lo;
  lo.config = test::data_file("fixtures/hf/mixtral_classic_config.json");
  const model::weights w = io::load_model(test::data_file("fixtures/hf/mixtral_classic.safetensors"), lo);
  std::mt19937 rng(111);
  std::vector<std::vector<std::int32_t>> windows(4, std::vector<std::int32_t>(64));
  for (auto& win : windows)
    for (auto& t : win) t = std::int32_t(rng() % std::uint32_t(w.config.vocab_size));
  const auto inputs = [&](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, windows); };
  const std::vector<std::int32_t> probe{1, 7, 30, 2, 45, 11};
  test::temp_dir tmp;
  for (auto method : convert::all_mone_methods) {
    model::weights p = w;
    convert::mone_options o;
    o.method = method;
    o.count = 2;  // of 4 experts per layer, top-2
    const auto rep = convert::mone_model(p, inputs, o);
    INFO(convert::mone_method_name(method));
    REQUIRE(rep.experts_pruned == 4);
    REQUIRE(model::parameter_count(w) - model::parameter_count(p) == rep.params_freed);
    const matrix y = test::logits(p, probe);
    REQUIRE(y.allFinite());
    const std::string dir = tmp / std::string(convert::mone_method_name(method));
    io::save_native(p, dir);
    REQUIRE(test::logits(io::load_native(dir), probe) == y);
  }
}

TEST_CASE("the greedy search adds the candidate that raises the summed G least, each cross term counted twice (G symmetric), as the exhaustive one finds") {
  // Pairs: {0,1}: 0.9 + 1.0 + 2·0.15 = 2.2, {0,2}: 0.9 + 1.2 = 2.1, {1,2}: 2.2.
  Eigen::MatrixXd g(3, 3);
  g << 0.9, 0.15, 0.0, 0.15, 1.0, 0.0, 0.0, 0.0, 1.2;
  const auto greedy = convert::detail::min_error_subset(g, 2, 0.0);
  REQUIRE(greedy.kind == "greedy");
  CHECK(greedy.chosen == std::vector<index_t>{0, 2});
  CHECK(greedy.error == Approx(2.1));
  const auto exhaustive = convert::detail::min_error_subset(g, 2, 1e4);
  REQUIRE(exhaustive.kind == "exhaustive");
  CHECK(exhaustive.chosen == std::vector<index_t>{0, 2});
  CHECK(exhaustive.error == Approx(2.1));
}
