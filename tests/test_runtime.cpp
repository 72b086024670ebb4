// The OpenMP kernels against the scalar reference: odd shapes, every k, shared
// experts, novices, major-only and dropped pairs, DualSparse sub-experts, 1 to 4
// threads on shapes that really split across the team, bit-identical across
// thread counts; router semantics; bad input.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include <omp.h>

#include "moeforge/model/transformer.hpp"
#include "moeforge/runtime/dense_ffn.hpp"
#include "moeforge/runtime/moe_ffn.hpp"
#include "moeforge/runtime/prepared.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/threads.hpp"

using namespace moeforge;
using namespace moeforge::test;

namespace {

float max_abs_diff(const matrix& a, const matrix& b) { return a.rows() ? (a - b).cwiseAbs().maxCoeff() : 0.0f; }

/// Allowed error of a k-term float product per unit of sqrt(k)·Σ|terms|: a
/// few units in the last place (2^-24 each).
constexpr double product_tolerance = 4.0 / (1 << 24);

/// Cuts every routed expert into `p` sub-experts of near-equal width
/// (DualSparse's partial transformation; p need not divide the width).
void split_experts(moe_layer& m, index_t p) {
  for (auto& ex : m.experts) {
    ex.parts.clear();
    if (ex.is_novice()) continue;
    for (index_t i = 1; i < p; ++i) ex.parts.push_back((i * ex.width() + p / 2) / p);
  }
}

/// Weights scaled so every activation and output is O(1) however wide the
/// layer is: then one absolute tolerance fits every shape.
void normalise_weights(moe_layer& m) {
  const auto scale = [&](ffn& f) {
    const float in = 1.0f / (0.3f * std::sqrt(float(f.hidden()))), out = 1.0f / (0.3f * std::sqrt(float(f.intermediate())));
    f.up *= in;
    if (f.gated()) f.gate *= in;
    f.down *= out;
  };
  for (auto& ex : m.experts)
    if (!ex.is_novice()) scale(ex.weights);
  for (auto& s : m.shared) scale(s.weights);
}

/// The scalar reference of a selection with its per-pair work.
matrix kernel_reference(const moe_layer& m, const runtime::selection& sel, const matrix& x) {
  matrix y(x.rows(), m.hidden());
  for (index_t t = 0; t < x.rows(); ++t) {
    std::vector<index_t> experts, widths;
    std::vector<double> weights;
    for (index_t j = 0; j < sel.k; ++j) {
      const std::size_t at = std::size_t(t * sel.k + j);
      if (sel.work[at] == runtime::pair_work::dropped) continue;
      const auto& ex = m.experts[std::size_t(sel.expert[at])];
      experts.push_back(sel.expert[at]);
      weights.push_back(sel.weight[at]);
      widths.push_back(sel.work[at] == runtime::pair_work::major ? ex.major_width() : ex.width());
    }
    const auto v = reference::moe_token(m, x.row(t).data(), experts, weights, widths);
    for (index_t d = 0; d < m.hidden(); ++d) y(t, d) = float(v[std::size_t(d)]);
  }
  return y;
}

/// The multiply-adds of a plan as the kernel counts them against
/// min_parallel_fma (below it, everything runs on the calling thread).
double planned_fma(const moe_layer& m, const runtime::routing_plan& plan) {
  double fma = 0;
  for (const auto& s : m.shared) fma += double(plan.tokens) * double(s.weights.intermediate()) * double(m.hidden()) * 3;
  for (index_t p = 0; p < plan.pairs(); ++p) fma += double(plan.width[std::size_t(p)]) * double(m.hidden()) * 3;
  return fma;
}

/// Runs `plan` with 1, 2, 3 and 4 threads; checks each against `want` and
/// that all four are bit-identical.
void check_threads(const moe_layer& m, const runtime::routing_plan& plan, const matrix& x, const matrix& want, float tol) {
  matrix first;
  for (int threads : {1, 2, 3, 4}) {
    const matrix got = with_threads(threads, [&] {
      matrix y(x.rows(), m.hidden());
      runtime::moe_forward(m, plan, x, y);
      return y;
    });
    INFO("threads " << threads);
    REQUIRE(max_abs_diff(got, want) < tol);
    if (threads == 1)
      first = got;
    else
      REQUIRE(got == first);  // bit-identical across thread counts
  }
}

}  // namespace

TEST_CASE("the MoE kernel matches the scalar reference on odd shapes for every k and thread count") {
  // Accuracy on shapes around the edges. Only the T = 300 cases with several
  // experts per token cross min_parallel_fma, so `one == two` compares two
  // team sizes there alone; the tests below check bit-identity on shapes that
  // always split.
  std::mt19937 rng(1);
  for (int shared : {0, 1, 2}) {
    for (auto kind : all_router_kinds) {
      layer_spec s;
      s.shared = shared;
      s.shared_gate = shared == 2;
      s.kind = kind;
      moe_layer m = random_layer(s, rng);
      for (index_t k = 1; k <= m.num_experts(); ++k) {
        m.router.top_k = k;
        m.router.renormalize = k % 2 == 1;
        for (index_t t : {1, 2, 3, 4, 5, 7, 16, 17, 64, 300}) {
          const matrix x = random_matrix(t, s.hidden, rng, 1.0f);
          const matrix want = reference::moe(m, x);
          const matrix one = with_threads(1, [&] { return runtime::moe_forward(m, x); });
          const matrix two = with_threads(2, [&] { return runtime::moe_forward(m, x); });
          INFO("shared " << shared << " kind " << router_kind_name(kind) << " k " << k << " T " << t);
          REQUIRE(max_abs_diff(one, want) < 1e-4f);
          REQUIRE(one == two);  // bit-identical across thread counts
        }
      }
    }
  }
}

TEST_CASE("novice experts add their constant output times the gate weight") {
  std::mt19937 rng(2);
  layer_spec s;
  s.novices = {1, 3};
  s.shared = 1;
  moe_layer m = random_layer(s, rng);
  validate(m, "test");
  m.router.top_k = 3;
  const matrix x = random_matrix(50, s.hidden, rng, 1.0f);
  CHECK(max_abs_diff(runtime::moe_forward(m, x), reference::moe(m, x)) < 1e-4f);
}

TEST_CASE("major-only pairs compute the expert's leading neurons and dropped pairs nothing") {
  std::mt19937 rng(3);
  layer_spec s;
  s.shared = 1;
  s.novices = {2};
  moe_layer m = random_layer(s, rng);
  m.experts[0].major = 5;  // explicit major width; the others take half, rounded up
  m.router.top_k = 3;
  for (index_t t : {1, 7, 64}) {
    const matrix x = random_matrix(t, s.hidden, rng, 1.0f);
    auto sel = runtime::select_topk(m.router, runtime::router_probs(m.router, x));
    std::uniform_int_distribution<int> pick(0, 2);
    for (auto& w : sel.work) w = runtime::pair_work(pick(rng));
    // Below min_parallel_fma: the calling thread computes it whatever the
    // thread count; the team runs these cases on the wider layers below.
    const auto plan = runtime::make_plan(m, sel, x);
    matrix y(t, s.hidden);
    runtime::moe_forward(m, plan, x, y);
    INFO("T " << t);
    REQUIRE(max_abs_diff(y, kernel_reference(m, sel, x)) < 1e-4f);
  }
  const auto plan_counts = [&](runtime::pair_work w) {
    const matrix x = random_matrix(20, s.hidden, rng, 1.0f);
    auto sel = runtime::select_topk(m.router, runtime::router_probs(m.router, x));
    std::fill(sel.work.begin(), sel.work.end(), w);
    return runtime::make_plan(m, sel, x).pairs();
  };
  CHECK(plan_counts(runtime::pair_work::dropped) == 0);
  CHECK(plan_counts(runtime::pair_work::full) == 60);
}

TEST_CASE("dropped, major-only and partitioned experts match the reference on the GEMM path, bit-identical for 1-4 threads") {
  // H = 333 is over one output-row chunk of the GEMM path (256 rows), so phase
  // 2 has two tasks; T = 7, 64 and 300 cross min_parallel_fma (checked below),
  // so both phases really run on the team. T = 1 on this shape stays under it
  // and runs on the calling thread: the streaming test below covers T = 1 on
  // the team. Widths are odd, P = 3 and 4 do not divide them, and the major
  // part is the first sub-expert (P = 2), inside one (P = 3) or the default half.
  std::mt19937 rng(11);
  layer_spec s;
  s.hidden = 333;
  s.widths = {231, 300, 97, 357, 261};
  s.shared = 1;
  s.novices = {2};
  moe_layer m = random_layer(s, rng);
  normalise_weights(m);
  m.router.top_k = 3;
  std::uniform_int_distribution<int> pick(0, 2);
  for (index_t p = 1; p <= 4; ++p) {
    split_experts(m, p);
    for (auto& ex : m.experts) ex.major = p == 2 && !ex.is_novice() ? ex.parts[0] : p == 3 ? ex.width() / 3 + 5 : 0;
    validate(m, "layer");
    for (index_t t : {1, 7, 64, 300}) {
      const matrix x = random_matrix(t, s.hidden, rng, 1.0f);
      auto sel = runtime::select_topk(m.router, runtime::router_probs(m.router, x));
      for (auto& w : sel.work) w = runtime::pair_work(pick(rng));
      const auto plan = runtime::make_plan(m, sel, x);
      INFO("P " << p << " T " << t);
      if (t > 1) REQUIRE(planned_fma(m, plan) >= runtime::detail::min_parallel_fma);
      REQUIRE(s.hidden > runtime::detail::row_chunk(t));
      check_threads(m, plan, x, kernel_reference(m, sel, x), 1e-4f);
    }
  }
}

TEST_CASE("dropped, major-only and partitioned experts match the reference with few tokens read in place, on the whole team") {
  // Few tokens on wide experts: T = 1..4 are read in place from their rows
  // (weights streamed panel by panel), every plan is over min_parallel_fma (checked), and
  // H = 700 spans many output-row chunks, so both phases split across threads.
  std::mt19937 rng(12);
  layer_spec s;
  s.hidden = 700;
  s.widths = {1001, 777, 1203, 650};
  moe_layer m = random_layer(s, rng);
  normalise_weights(m);
  m.router.top_k = 2;
  for (index_t p = 1; p <= 4; ++p) {
    split_experts(m, p);
    for (auto& ex : m.experts) ex.major = p == 4 ? ex.parts[1] : 0;
    validate(m, "layer");
    for (index_t t : {1, 2, 3, 4}) {
      const matrix x = random_matrix(t, s.hidden, rng, 1.0f);
      auto sel = runtime::select_topk(m.router, runtime::router_probs(m.router, x));
      // Every pair of token 0 computes something, so every plan crosses the threshold.
      for (std::size_t i = 0; i < sel.work.size(); ++i) sel.work[i] = runtime::pair_work((i + std::size_t(p + t)) % (i < 2 ? 2 : 3));
      const auto plan = runtime::make_plan(m, sel, x);
      INFO("P " << p << " T " << t);
      REQUIRE(t <= runtime::detail::gemm_tokens_in_place);
      REQUIRE(planned_fma(m, plan) >= runtime::detail::min_parallel_fma);
      REQUIRE(s.hidden > 4 * runtime::detail::row_chunk(t));
      check_threads(m, plan, x, kernel_reference(m, sel, x), 1e-4f);
    }
  }
}

TEST_CASE("the router's drop policy reaches the kernel: route() and moe_forward(layer, x) compute the kept work only") {
  std::mt19937 rng(13);
  layer_spec s;
  s.hidden = 300;
  s.widths = {131, 200, 77, 257, 161};
  moe_layer m = random_layer(s, rng);
  normalise_weights(m);
  m.router.top_k = 3;
  split_experts(m, 2);
  m.router.drop.kind = drop_kind::two_t;
  m.router.drop.threshold = 0.3f;
  m.router.drop.margin = 0.05f;
  const matrix x = random_matrix(64, s.hidden, rng, 1.0f);
  const auto sel = runtime::select(m, x);
  const auto count = [&](runtime::pair_work w) { return std::count(sel.work.begin(), sel.work.end(), w); };
  REQUIRE(count(runtime::pair_work::full) > 0);  // the policy does all three things here
  REQUIRE(count(runtime::pair_work::major) > 0);
  REQUIRE(count(runtime::pair_work::dropped) > 0);
  const matrix want = kernel_reference(m, sel, x);
  CHECK(max_abs_diff(with_threads(1, [&] { return runtime::moe_forward(m, x); }), want) < 1e-4f);
  CHECK(with_threads(1, [&] { return runtime::moe_forward(m, x); }) == with_threads(2, [&] { return runtime::moe_forward(m, x); }));
}

TEST_CASE("a partitioned layer without dropping equals the unpartitioned layer") {
  // The sub-experts share their expert's gate weight, so only the order of
  // float summation may differ (the kernel may run them as one job or several).
  std::mt19937 rng(14);
  layer_spec s;
  s.hidden = 300;
  s.widths = {131, 200, 77, 257, 161};
  s.shared = 1;
  moe_layer m = random_layer(s, rng);
  normalise_weights(m);
  m.router.top_k = 2;
  for (index_t t : {1, 7, 64, 300}) {
    const matrix x = random_matrix(t, s.hidden, rng, 1.0f);
    split_experts(m, 1);
    const matrix whole = runtime::moe_forward(m, x);
    for (index_t p = 2; p <= 4; ++p) {
      split_experts(m, p);
      INFO("P " << p << " T " << t);
      CHECK(max_abs_diff(runtime::moe_forward(m, x), whole) < 1e-5f);
    }
  }
}

// [one-thread]: the products run on the calling thread alone, so the race
// pass (scripts/test) leaves this sweep out.
TEST_CASE("the weight-streaming and packed products equal a plain double-precision product", "[one-thread]") {
  // Shapes around every blocking edge of both instruction sets: tokens (6 or 8
  // per micro-tile and partial tiles, 96 or 128 per packed block, 32 or 48 the
  // streaming limit, 1-4 per streaming group, 3 the start of the AVX-512 tiles,
  // 1 with up to four panels side by side, 2-6 (AVX-512) or 2 (AVX2) with
  // two: n = 31 gives 3 panels with AVX-512's 32-row panels, an odd one out),
  // weight rows (16 or 32 per panel, 8 per transposed group, 6 per streaming
  // tile), depth (8 or 16 lanes, 256 or 1024 per depth block).
  std::mt19937 rng(5);
  for (index_t m : {1, 2, 3, 4, 5, 7, 9, 13, 32, 33, 48, 49, 97, 129, 193})
    for (index_t n : {1, 7, 15, 31, 33})
      for (index_t k : {0, 7, 17, 256, 300, 1024, 1100}) {
        const matrix b = random_matrix(m, k, rng), gate = random_matrix(n, k, rng), up = random_matrix(n + 2, k, rng);
        const matrix got = runtime::detail::times_transpose({runtime::detail::rows_of(gate), runtime::detail::rows_of(up)}, b);
        Eigen::MatrixXd want(m, 2 * n + 2), magnitude(m, 2 * n + 2);
        want << b.cast<double>() * gate.cast<double>().transpose(), b.cast<double>() * up.cast<double>().transpose();
        const Eigen::MatrixXd bm = b.cast<double>().cwiseAbs();
        magnitude << bm * gate.cast<double>().cwiseAbs().transpose(), bm * up.cast<double>().cwiseAbs().transpose();
        INFO("m " << m << ", n " << n << ", k " << k);
        REQUIRE(got.rows() == m);
        REQUIRE(got.cols() == 2 * n + 2);
        // Float rounding of a k-term sum grows like sqrt(k) times the terms'
        // magnitude Σ|b·a| (any summation order, for these random signs). The
        // worst case is 1.2 units on the AVX-512, AVX2 and no-SIMD paths alike;
        // one term lost at k = 1100 is hundreds of units.
        const Eigen::ArrayXXd err = (got.cast<double>() - want).array().abs();
        const Eigen::ArrayXXd bound = product_tolerance * std::sqrt(double(k) + 1) * magnitude.array();
        CHECK((err <= bound).all());
        // A token's products are the same FMA chains alone (panels read side
        // by side for a few tokens) as in any batch, bit for bit.
        const matrix alone = runtime::detail::times_transpose({runtime::detail::rows_of(gate), runtime::detail::rows_of(up)}, b.topRows(1));
        CHECK(alone.row(0) == got.row(0));
        if (m >= 2) CHECK(runtime::detail::times_transpose({runtime::detail::rows_of(gate), runtime::detail::rows_of(up)}, b.topRows(2)) == got.topRows(2));
        if (k == 300 || k == 1100) {
          // The same with prepared panels, read in place: up to MR tokens
          // read each panel's whole depth at once (more, in blocks of KC),
          // up to gemm_pair_rows of them two panels side by side. Every
          // prefix of the tokens gives the batch's rows, and F32 panels the
          // plain weights' bits; BF16 ones through their exact few-token path,
          // the rounded plain weights' bits, and past it (tokens rounded for
          // vdpbf16ps, two panels side by side up to gemm_pair_rows) the
          // rows of any larger batch.
          for (const dtype type : {dtype::f32, dtype::bf16}) {
            const runtime::detail::panel_matrix pg(gate.data(), gate.outerStride(), n, k, {}, type), pu(up.data(), up.outerStride(), n + 2, k, {}, type);
            const auto product = [&](index_t tokens) { return runtime::detail::times_transpose({pg.block(0, n, 0), pu.block(0, n + 2, 0)}, b.topRows(tokens)); };
            const index_t most = type == dtype::f32 ? m : std::min(m, runtime::detail::bf16_exact_tokens);
            const matrix batch = product(most);
            INFO(dtype_name(type));
            if (type == dtype::f32) {
              CHECK(batch == got);
            } else {
              const matrix rounded_gate = rounded_to_bf16(gate), rounded_up = rounded_to_bf16(up);
              CHECK(batch == runtime::detail::times_transpose({runtime::detail::rows_of(rounded_gate), runtime::detail::rows_of(rounded_up)}, b.topRows(most)));
            }
            // (Up to two panels and a short one: token counts whose last two panels share their tokens, token_panels.)
            const index_t prefixes = 2 * runtime::detail::gemm_mr + 5;
            for (index_t t = 1; t <= std::min(most, prefixes); ++t) CHECK(product(t) == batch.topRows(t));
            if (type == dtype::bf16 && m > most) {
              const matrix rounded_batch = product(m);
              for (index_t t = most + 1; t <= std::min(m, prefixes); ++t) CHECK(product(t) == rounded_batch.topRows(t));
            }
          }
        }
      }
}

/// Inputs that reach every branch of the activations: a fine sweep over
/// [-100, 100] (SiLU's exponential is clamped outside [-88, 87]), the clamp
/// edges, tiny and huge values, signed zeros and a NaN.
std::vector<float> activation_inputs() {
  std::vector<float> v;
  for (float x = -100.0f; x <= 100.0f; x += 0.0137f) v.push_back(x);
  for (float x : {0.0f, -0.0f, 1e-30f, -1e-30f, 1e-40f, 86.9f, 87.0f, 87.1f, 88.0f, 88.1f, -86.9f, -87.0f, -87.1f, -88.0f, -88.1f, 1e30f, -1e30f,
                  std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(), std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()})
    v.push_back(x);
  return v;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

TEST_CASE("activations along a row compute what the scalar form computes, bit for bit, wherever a value falls in a vector") {
  std::mt19937 rng(41);
  const std::vector<float> inputs = activation_inputs();
  std::vector<float> up(inputs.size());
  for (auto& u : up) u = std::normal_distribution<float>(0.0f, 2.0f)(rng);
  for (auto a : {activation::silu, activation::gelu, activation::relu})
    for (bool gated : {true, false})
      for (index_t offset : {0, 1, 5}) {  // runs of every length, starting on and off a vector boundary
        for (index_t n = 0; n <= 40 && offset + n <= index_t(inputs.size()); ++n) {
          std::vector<float> out(std::size_t(n), -1.0f);
          activate_row(a, inputs.data() + offset, gated ? up.data() + offset : nullptr, out.data(), n);
          for (index_t i = 0; i < n; ++i) {
            const float g = inputs[std::size_t(offset + i)], want = gated ? activate(a, g) * up[std::size_t(offset + i)] : activate(a, g);
            INFO(activation_name(a) << " gated " << gated << " n " << n << " i " << i << " input " << g);
            REQUIRE(same_bits(out[std::size_t(i)], want));
          }
        }
        // The whole sweep in one row, written over its input.
        std::vector<float> row = inputs;
        activate_row(a, row.data(), gated ? up.data() : nullptr, row.data(), index_t(row.size()));
        for (std::size_t i = 0; i < row.size(); ++i) {
          INFO(activation_name(a) << " gated " << gated << " input " << inputs[i]);
          REQUIRE(same_bits(row[i], gated ? activate(a, inputs[i]) * up[i] : activate(a, inputs[i])));
        }
      }
}

TEST_CASE("SiLU is within 3 ulp of x / (1 + e^-x) computed in double, and what that gives at infinity and NaN") {
  for (const float x : activation_inputs()) {
    const float got = activate(activation::silu, x);
    INFO("x " << x);
    if (!std::isfinite(x)) {  // NaN and -inf give NaN (-inf / inf), +inf itself
      CHECK((x > 0 ? got == x : std::isnan(got)));
      continue;
    }
    const double want = double(x) / (1.0 + std::exp(-double(x)));
    // Past -88 the result is -0 where the true one is under 1e-36 in magnitude.
    const double ulp = float(want) == 0.0f ? 0.0 : std::ldexp(1.0, std::ilogb(float(want)) - 23);  // (ilogb(0) is INT_MIN)
    CHECK(std::abs(double(got) - want) <= 3.0 * ulp + 1e-35);
  }
}

TEST_CASE("the dense kernel matches the reference for every activation, gated and not") {
  // H = 45 is one output-row chunk and T <= 3 stays under min_parallel_fma:
  // bit-identity on shapes that split is in test_determinism.cpp.
  std::mt19937 rng(4);
  for (auto a : {activation::silu, activation::gelu, activation::relu}) {
    for (bool gated : {true, false}) {
      const ffn f = random_ffn(45, 333, rng, a, gated);
      for (index_t t : {1, 3, 64, 129}) {
        const matrix x = random_matrix(t, 45, rng, 1.0f);
        const matrix one = with_threads(1, [&] { return runtime::dense_forward(f, x); });
        const matrix two = with_threads(2, [&] { return runtime::dense_forward(f, x); });
        INFO(activation_name(a) << " gated " << gated << " T " << t);
        REQUIRE(max_abs_diff(one, reference::dense(f, x)) < 1e-4f);
        REQUIRE(one == two);
      }
    }
  }
}

TEST_CASE("softmax top-k routing: renormalisation, scale and ties to the lower index") {
  moe_layer m;
  std::mt19937 rng(5);
  m.router.weight = matrix::Zero(4, 3);
  m.router.weight.row(0) << 1, 0, 0;
  m.router.weight.row(1) << 0, 1, 0;
  m.router.weight.row(2) << 0, 1, 0;  // ties with expert 1
  m.router.weight.row(3) << 0, 0, 1;
  m.router.top_k = 2;
  matrix x(1, 3);
  x << 0.0f, 2.0f, 0.5f;
  const matrix p = runtime::router_probs(m.router, x);
  CHECK(p.sum() == Approx(1.0f));
  auto sel = runtime::select_topk(m.router, p);
  CHECK(sel.expert == std::vector<std::int32_t>{1, 2});
  CHECK(sel.weight[0] == Approx(0.5f));
  m.router.renormalize = false;
  m.router.scale = 2.5f;
  sel = runtime::select_topk(m.router, p);
  CHECK(sel.weight[0] == Approx(2.5 * std::exp(2.0) / (1 + 2 * std::exp(2.0) + std::exp(0.5))));
  m.router.kind = router_kind::cmoe_analytic;
  m.router.weight_up = matrix::Ones(4, 3);
  m.router.scale = 1.0f;
  sel = runtime::select_topk(m.router, runtime::router_probs(m.router, x));
  CHECK(sel.weight == std::vector<float>{1.0f, 1.0f});  // CMoE gates are exactly 1
  // |silu(g·x)·(u·x)| ranks expert 1 and 2 (tied) above 3 and 0.
  CHECK(sel.expert == std::vector<std::int32_t>{1, 2});
  (void)rng;
}

TEST_CASE("a router packed into panels scores as the router itself, bit for bit, for every learned kind") {
  std::mt19937 rng(41);
  const index_t experts = 5, hidden = 37, rank = 3;
  for (const router_kind kind : {router_kind::softmax_topk, router_kind::cmoe_analytic, router_kind::centroid_topk, router_kind::linear_topk,
                                 router_kind::quadratic_topk}) {
    router r;
    r.kind = kind;
    r.weight = random_matrix(experts, hidden, rng, 0.3f);
    if (kind == router_kind::cmoe_analytic) r.weight_up = random_matrix(experts, hidden, rng, 0.3f);
    if (r.fitted()) r.bias = random_matrix(experts, 1, rng, 0.3f);
    if (kind == router_kind::quadratic_topk) {
      r.projection = random_matrix(rank, hidden, rng, 0.3f);
      r.projection_bias = random_matrix(rank, 1, rng, 0.3f);
      r.weight_quad = random_matrix(experts, rank * (rank + 1) / 2, rng, 0.3f);
    }
    const auto panels = runtime::detail::pack_router(r);
    CHECK(panels.weight_up.rows() == r.weight_up.rows());
    CHECK(panels.projection.rows() == r.projection.rows());
    CHECK(panels.weight_quad.rows() == r.weight_quad.rows());
    for (const index_t t : {1, 7, 64}) {
      INFO(router_kind_name(kind) << ", T " << t);
      const matrix x = random_matrix(t, hidden, rng, 1.0f);
      const matrix want = runtime::router_probs(r, x);
      CHECK(runtime::router_probs(r, x, &panels) == want);
      // Every matrix counts: panels of another router's values score otherwise.
      for (matrix router::*part : {&router::weight, &router::weight_up, &router::projection, &router::weight_quad}) {
        if (!(r.*part).size()) continue;
        router other = r;
        other.*part = random_matrix((r.*part).rows(), (r.*part).cols(), rng, 0.3f);
        const auto other_panels = runtime::detail::pack_router(other);
        CHECK_FALSE(runtime::router_probs(r, x, &other_panels) == want);
      }
    }
  }
  // A router of BF16 values (a BF16 checkpoint's) is packed in BF16, half the bytes, and scores the same.
  for (const index_t t : {1, 7, 64}) {
    router r;
    r.weight = rounded_to_bf16(random_matrix(experts, hidden, rng, 0.3f));
    const auto panels = runtime::detail::pack_router(r);
    CHECK(panels.weight.type() == dtype::bf16);
    const matrix x = random_matrix(t, hidden, rng, 1.0f);
    CHECK(runtime::router_probs(r, x, &panels) == runtime::router_probs(r, x));
    r.weight(experts - 1, hidden - 1) = std::nextafter(r.weight(experts - 1, hidden - 1), 1.0f);  // one value BF16 cannot hold
    CHECK(runtime::detail::pack_router(r).weight.type() == dtype::f32);
  }
  // Panels of a router of another shape are refused, naming the mismatch.
  router r;
  r.weight = random_matrix(experts, hidden, rng, 0.3f);
  router wider = r;
  wider.weight = random_matrix(experts, hidden + 1, rng, 0.3f);
  const auto wrong = runtime::detail::pack_router(wider);
  CHECK_THROWS_AS(runtime::router_probs(r, random_matrix(2, hidden, rng, 1.0f), &wrong), shape_error);
}

TEST_CASE("bad input is rejected before any work with a typed error") {
  std::mt19937 rng(6);
  layer_spec s;
  moe_layer m = random_layer(s, rng);
  m.router.top_k = 2;
  SECTION("wrong feature count") {
    const matrix x = random_matrix(3, s.hidden + 1, rng);
    CHECK_THROWS_AS(runtime::moe_forward(m, x), shape_error);
    CHECK_THROWS_AS(runtime::dense_forward(m.experts[0].weights, x), shape_error);
  }
  SECTION("NaN or Inf in the input names the token") {
    matrix x = random_matrix(3, s.hidden, rng);
    x(2, 5) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH(runtime::moe_forward(m, x), Catch::Contains("token 2"));
    x(2, 5) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_AS(runtime::dense_forward(m.experts[0].weights, x), value_error);
  }
  SECTION("a finite input whose router scores overflow names the token") {
    matrix x = random_matrix(3, s.hidden, rng);
    x.row(1).setConstant(std::numeric_limits<float>::max());  // finite, but its scores are +-Inf and its probabilities NaN
    CHECK_THROWS_AS(runtime::select(m, x), value_error);
    CHECK_THROWS_WITH(runtime::moe_forward(m, x), Catch::Contains("token 1") && Catch::Contains("probabilities"));
  }
  SECTION("NaN in weights is found by require_finite") {
    m.experts[3].weights.down(1, 1) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH(require_finite(m, "layer"), Catch::Contains("experts[3].down"));
  }
  SECTION("k outside 1..E") {
    const matrix x = random_matrix(3, s.hidden, rng);
    m.router.top_k = 6;
    CHECK_THROWS_AS(runtime::moe_forward(m, x), config_error);
    m.router.top_k = 0;
    CHECK_THROWS_AS(runtime::moe_forward(m, x), config_error);
  }
  SECTION("a plan made for another batch") {
    const matrix x = random_matrix(3, s.hidden, rng);
    const auto plan = runtime::route(m, x);
    const matrix x4 = random_matrix(4, s.hidden, rng);
    matrix y(4, s.hidden);
    CHECK_THROWS_AS(runtime::moe_forward(m, plan, x4, y), shape_error);
  }
  SECTION("a selection made for other tokens or another layer") {
    const matrix x = random_matrix(3, s.hidden, rng);
    runtime::selection sel = runtime::select(m, x);
    CHECK_THROWS_WITH(runtime::make_plan(m, sel, random_matrix(4, s.hidden, rng)), Catch::Contains("selection is for 3 tokens"));
    sel.expert[4] = std::int32_t(m.num_experts());
    CHECK_THROWS_WITH(runtime::make_plan(m, sel, x), Catch::Contains("names expert 5"));
    CHECK_THROWS_AS(runtime::count_work(m, sel), shape_error);
    sel.expert[4] = -1;
    CHECK_THROWS_AS(runtime::make_plan(m, sel, x), shape_error);
    sel = runtime::select(m, x);
    sel.weight.pop_back();
    CHECK_THROWS_WITH(runtime::make_plan(m, sel, x), Catch::Contains("k = 2 pairs for each of its 3 tokens"));
  }
  SECTION("a hand-made plan that does not hold together") {
    const matrix x = random_matrix(3, s.hidden, rng);
    matrix y(3, s.hidden);
    const auto good = runtime::route(m, x);
    auto plan = good;
    plan.token[1] = 3;
    CHECK_THROWS_WITH(runtime::moe_forward(m, plan, x, y), Catch::Contains("names token 3"));
    plan = good;
    plan.width.pop_back();
    CHECK_THROWS_AS(runtime::moe_forward(m, plan, x, y), shape_error);
    plan = good;
    std::swap(plan.offsets[1], plan.offsets[2]);
    if (plan.offsets[1] != plan.offsets[2]) CHECK_THROWS_WITH(runtime::moe_forward(m, plan, x, y), Catch::Contains("offsets"));
    plan = good;
    plan.offsets.back() += 1;
    CHECK_THROWS_WITH(runtime::moe_forward(m, plan, x, y), Catch::Contains("offsets"));
  }
  SECTION("an empty batch gives an empty result") {
    const matrix x(0, s.hidden);
    CHECK(runtime::moe_forward(m, x).rows() == 0);
    CHECK(runtime::dense_forward(m.experts[0].weights, x).rows() == 0);
  }
}

TEST_CASE("drop policy for another layer: refused, not read past") {
  // Per-expert factors are indexed by the selected experts: a list made for a
  // layer of other experts (one pruned, say) must be a typed error, not a read
  // past its end or another expert's factor; a NaN threshold silently dropped
  // every pair.
  std::mt19937 rng(6);
  layer_spec s;
  moe_layer m = random_layer(s, rng);
  m.router.top_k = 2;
  const matrix x = random_matrix(3, s.hidden, rng);
  m.router.drop.kind = drop_kind::one_t;
  m.router.drop.threshold = 0.3f;
  m.router.drop.expert_factor.assign(std::size_t(m.num_experts() + 1), 0.5f);  // in bounds, but not this layer's
  REQUIRE_THROWS_WITH(runtime::moe_forward(m, x), Catch::Contains("expert_factor: 6 entries, expected 5"));
  m.router.drop.expert_factor.assign(1, 0.5f);
  CHECK_THROWS_AS(runtime::select(m, x), config_error);
  runtime::selection sel = runtime::select_topk(m.router, runtime::router_probs(m.router, x));
  CHECK_THROWS_AS(runtime::apply_drop(m.router.drop, sel), config_error);  // alone, without the layer
  m.router.drop.expert_factor.clear();
  m.router.drop.threshold = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(runtime::moe_forward(m, x), config_error);
}

TEST_CASE("group work of a misfit placement: a typed error") {
  // group_work indexes the placement by expert and the loads by group: a
  // placement for other experts, or a group past `groups`, must not read or
  // write past either.
  std::mt19937 rng(6);
  layer_spec s;
  moe_layer m = random_layer(s, rng);
  m.router.top_k = 2;
  const runtime::selection sel = runtime::select(m, random_matrix(3, s.hidden, rng));
  REQUIRE_THROWS_AS(runtime::group_work(m, sel, {0, 1, 0, 1, 0, 1}, 2, true), config_error);  // 6 experts' placement, in bounds
  CHECK_THROWS_AS(runtime::group_work(m, sel, {0, 1}, 2, true), config_error);
  CHECK_THROWS_AS(runtime::group_work(m, sel, {0, 1, 0, 1, 2}, 2, true), config_error);
  CHECK_THROWS_AS(runtime::group_work(m, sel, {0, -1, 0, 1, 0}, 2, false), config_error);
  CHECK(runtime::group_work(m, sel, {0, 1, 0, 1, 0}, 2, true).size() == 2);
}

TEST_CASE("a token's output sums its terms from +0: a pair of gate weight 0 gives +0, never -0") {
  std::mt19937 rng(8);
  layer_spec s;
  s.novices = {1};
  const moe_layer m = random_layer(s, rng);
  const matrix x = random_matrix(1, s.hidden, rng);
  for (const index_t e : {index_t(0), index_t(1)}) {  // an expert computed, a novice's vector
    INFO("expert " << e);
    runtime::routing_plan plan;
    plan.tokens = 1;
    plan.offsets.assign(std::size_t(m.num_experts() + 1), 0);
    for (index_t i = e + 1; i <= m.num_experts(); ++i) plan.offsets[std::size_t(i)] = 1;
    plan.token = {0};
    plan.weight = {0.0f};
    plan.width = {std::int32_t(m.experts[std::size_t(e)].width())};
    matrix y(1, s.hidden);
    runtime::moe_forward(m, plan, x, y);
    for (index_t d = 0; d < s.hidden; ++d) REQUIRE_FALSE(std::signbit(y(0, d)));
  }
}

// ---- Prepared layers: weights packed once into the kernel's panels.

namespace {

/// The scalar reference of any plan, whatever widths its pairs ask for.
matrix plan_reference(const moe_layer& m, const runtime::routing_plan& plan, const matrix& x) {
  std::vector<std::vector<index_t>> experts(std::size_t(x.rows())), widths(experts.size());
  std::vector<std::vector<double>> weights(experts.size());
  for (index_t e = 0; e < plan.experts(); ++e)
    for (index_t p = plan.offsets[std::size_t(e)]; p < plan.offsets[std::size_t(e + 1)]; ++p) {
      const auto t = std::size_t(plan.token[std::size_t(p)]);
      experts[t].push_back(e);
      weights[t].push_back(plan.weight[std::size_t(p)]);
      widths[t].push_back(plan.width[std::size_t(p)]);
    }
  matrix y(x.rows(), m.hidden());
  for (index_t t = 0; t < x.rows(); ++t) {
    const auto v = reference::moe_token(m, x.row(t).data(), experts[std::size_t(t)], weights[std::size_t(t)], widths[std::size_t(t)]);
    for (index_t d = 0; d < m.hidden(); ++d) y(t, d) = float(v[std::size_t(d)]);
  }
  return y;
}

}  // namespace

TEST_CASE("panel matrices hold each row's weights at its panel and lane, panels restarting at the cuts") {
  using runtime::detail::gemm_nr;
  std::mt19937 rng(21);
  const index_t rows = 2 * gemm_nr + 6, depth = 19, cut = gemm_nr + 1;
  const matrix w = random_matrix(rows, depth, rng);
  const runtime::detail::panel_matrix p(w.data(), w.outerStride(), rows, depth, {cut});
  CHECK(p.next_cut(0) == cut);
  CHECK(p.next_cut(cut) == rows);
  CHECK(p.locate(cut) == std::pair<index_t, index_t>{2, 0});  // rows [0, cut) fill two panels, the second with one row
  for (index_t r = 0; r < rows; ++r) {
    const auto [panel, lane] = p.locate(r);
    for (index_t k = 0; k < depth; ++k) REQUIRE(p.at<float>(panel, k)[lane] == w(r, k));
  }
  CHECK(p.at<float>(1, 3)[1] == 0.0f);  // padding rows of a segment's last panel are zero
}

TEST_CASE("prepared layers give bit-identical results to plain ones, against the reference, for 1-4 threads; BF16 ones to plain ones of the rounded weights") {
  // Odd widths and H = 333 (two GEMM-path row chunks); shared experts with a
  // sigmoid gate; a novice; major-only and dropped pairs with the major part
  // at the first sub-expert (panels restart there) and, in the last round,
  // pairs asking for arbitrary widths (over half), whose jobs start inside a panel. T = 4,
  // 7, 64 and 300 run on the team (checked); T = 1 on the calling thread, and
  // the wider layer below streams one token on the team. BF16 products over
  // 4 tokens (the shared experts' at T = 7) round their tokens, at 4 they do not.
  std::mt19937 rng(22);
  layer_spec s;
  s.hidden = 333;
  s.widths = {231, 300, 97, 357, 261};
  s.shared = 2;
  s.shared_gate = true;
  s.novices = {2};
  moe_layer m = random_layer(s, rng);
  normalise_weights(m);
  m.router.top_k = 3;
  std::uniform_int_distribution<int> pick(0, 2);
  for (int round = 0; round < 3; ++round) {
    split_experts(m, round == 0 ? 1 : 2);
    for (auto& ex : m.experts) ex.major = round == 1 && !ex.is_novice() ? ex.parts[0] : 0;
    validate(m, "layer");
    const runtime::prepared_moe prepared = runtime::prepare(m), bf16 = runtime::prepare(m, {dtype::bf16, false}),
                                bf16_dot = runtime::prepare(m, dtype::bf16);
    moe_layer rounded = m;  // what the BF16 panels hold: the expert weights rounded (the router stays F32)
    for (auto& ex : rounded.experts) round_to_bf16(ex.weights);
    for (auto& sh : rounded.shared) round_to_bf16(sh.weights);
    for (index_t t : {1, 4, 7, 64, 300}) {
      const matrix x = random_matrix(t, s.hidden, rng, 1.0f);
      auto sel = runtime::select_topk(m.router, runtime::router_probs(m.router, x));
      for (auto& w : sel.work) w = runtime::pair_work(pick(rng));
      auto plan = runtime::make_plan(m, sel, x);
      if (round == 2)
        for (index_t e = 0; e < plan.experts(); ++e)
          for (index_t p = plan.offsets[std::size_t(e)]; p < plan.offsets[std::size_t(e + 1)]; ++p)
            if (!m.experts[std::size_t(e)].is_novice())
              plan.width[std::size_t(p)] = std::int32_t(std::uniform_int_distribution<index_t>(m.experts[std::size_t(e)].width() / 2, m.experts[std::size_t(e)].width())(rng));
      INFO("round " << round << " T " << t);
      if (t > 1) REQUIRE(planned_fma(m, plan) >= runtime::detail::min_parallel_fma);
      const matrix want = plan_reference(m, plan, x);
      const auto run = [&](const auto& layer) {
        return for_each_thread_count([&] {
          matrix y(t, s.hidden);
          runtime::moe_forward(layer, plan, x, y);
          return y;
        });
      };
      const auto plain = run(m), packed = run(prepared), plain_rounded = run(rounded), packed_bf16 = run(bf16), dot = run(bf16_dot);
      REQUIRE(max_abs_diff(plain[0], want) < 1e-4f);
      REQUIRE(max_abs_diff(plain_rounded[0], plan_reference(rounded, plan, x)) < 1e-4f);
      REQUIRE(plain_rounded[0] != plain[0]);  // the rounding is visible, so equality below means something
      for (std::size_t i = 0; i < plain.size(); ++i) {
        INFO("threads " << i + 1);
        REQUIRE(plain[i] == plain[0]);
        REQUIRE(packed[i] == plain[0]);
        REQUIRE(packed_bf16[i] == plain_rounded[0]);
        REQUIRE(dot[i] == dot[0]);
      }
      // With BF16 tokens (vdpbf16ps, many tokens only), close to the exact
      // BF16 result: each token value moves by at most 2^-8 of itself.
      if (t > runtime::detail::bf16_exact_tokens && runtime::detail::bf16_dot_available) REQUIRE(dot[0] != plain_rounded[0]);
      if (t <= runtime::detail::bf16_exact_tokens || !runtime::detail::bf16_dot_available) REQUIRE(dot[0] == plain_rounded[0]);
      REQUIRE(max_abs_diff(dot[0], plain_rounded[0]) <= 2e-2f * plain_rounded[0].cwiseAbs().maxCoeff());
    }
  }
}

TEST_CASE("a prepared layer streams few tokens on the team bit-identically, and editing its source leaves it as prepared") {
  std::mt19937 rng(23);
  layer_spec s;
  s.hidden = 700;
  s.widths = {1001, 777, 1203, 650};
  s.shared = 1;
  moe_layer m = random_layer(s, rng);
  normalise_weights(m);
  m.router.top_k = 2;
  split_experts(m, 2);
  const runtime::prepared_moe prepared = runtime::prepare(m);
  const runtime::prepared_ffn dense = runtime::prepare(m.experts[1].weights);
  for (index_t t : {1, 2, 5}) {
    const matrix x = random_matrix(t, s.hidden, rng, 1.0f);
    auto sel = runtime::select_topk(m.router, runtime::router_probs(m.router, x));
    for (std::size_t i = 0; i < sel.work.size(); ++i) sel.work[i] = runtime::pair_work(i % 2);  // full and major-only
    const auto plan = runtime::make_plan(m, sel, x);
    REQUIRE(planned_fma(m, plan) >= runtime::detail::min_parallel_fma);
    INFO("T " << t);
    const auto plain = for_each_thread_count([&] {
      matrix y(t, s.hidden);
      runtime::moe_forward(m, plan, x, y);
      return y;
    });
    const auto packed = for_each_thread_count([&] {
      matrix y(t, s.hidden);
      runtime::moe_forward(prepared, plan, x, y);
      return y;
    });
    REQUIRE(max_abs_diff(plain[0], kernel_reference(m, sel, x)) < 1e-4f);
    for (std::size_t i = 0; i < plain.size(); ++i) REQUIRE((packed[i] == plain[0] && plain[i] == plain[0]));
    const auto dense_plain = for_each_thread_count([&] { return runtime::dense_forward(m.experts[1].weights, x); });
    const auto dense_packed = for_each_thread_count([&] { return runtime::dense_forward(dense, x); });
    REQUIRE(max_abs_diff(dense_plain[0], reference::dense(m.experts[1].weights, x)) < 1e-4f);
    for (std::size_t i = 0; i < dense_plain.size(); ++i) REQUIRE((dense_packed[i] == dense_plain[0] && dense_plain[i] == dense_plain[0]));
  }
  const matrix x = random_matrix(3, s.hidden, rng, 1.0f);
  const matrix before = runtime::moe_forward(prepared, x);
  m.experts[0].weights.up *= 2.0f;
  m.router.weight.setZero();
  CHECK(runtime::moe_forward(prepared, x) == before);
  CHECK(runtime::moe_forward(prepared.layer(), x) == before);
}

TEST_CASE("BF16 panels hold the rounded weights and project exactly as the rounded row-major weights do, or within BF16 token rounding") {
  using runtime::detail::gemm_nr;
  std::mt19937 rng(25);
  for (index_t rows : {index_t(1), gemm_nr - 1, 3 * gemm_nr + 5})
    for (index_t depth : {1, 17, 256, 301}) {
      const matrix w = random_matrix(rows, depth, rng);
      const matrix rounded = rounded_to_bf16(w);
      const runtime::detail::panel_matrix p(w.data(), w.outerStride(), rows, depth, {}, {dtype::bf16, false}),
          dot(w.data(), w.outerStride(), rows, depth, {}, dtype::bf16);
      INFO("rows " << rows << " depth " << depth);
      REQUIRE(p.type() == dtype::bf16);
      REQUIRE(p.bytes() == std::size_t(runtime::detail::panel_matrix::ceil_panels(rows) * gemm_nr * depth * 2));
      std::vector<float> row(static_cast<std::size_t>(depth));
      for (index_t r = 0; r < rows; ++r) {
        p.row_values(r, 0, depth, row.data());
        REQUIRE(Eigen::Map<const Eigen::RowVectorXf>(row.data(), depth) == rounded.row(r));
      }
      // 8 and 9: either side of bf16_exact_tokens (5 and 7: one token panel
      // over two weight panels side by side, and over one); 20: BF16
      // tokens, though the F32 path would read them in place.
      for (index_t t : {1, 5, 7, 8, 9, 20, 33, 100}) {
        const matrix x = random_matrix(t, depth, rng, 1.0f);
        const auto got = for_each_thread_count([&] { return runtime::project(x, p); });
        const auto got_dot = for_each_thread_count([&] { return runtime::project(x, dot); });
        const matrix want = runtime::project(x, rounded);
        for (std::size_t i = 0; i < got.size(); ++i) REQUIRE((got[i] == want && got_dot[i] == got_dot[0]));
        // BF16 tokens (8 significant bits): each term x·w moves by at most 2^-8·|x·w|, plus float rounding of the sum.
        const matrix bound = (x.cwiseAbs() * rounded.cwiseAbs().transpose()) * (std::ldexp(1.0f, -8) + 1e-5f) +
                             matrix::Constant(t, rows, 1e-30f);
        REQUIRE(((got_dot[0] - want).cwiseAbs().array() <= bound.array()).all());
        const bool dot_ran = t > runtime::detail::bf16_exact_tokens && runtime::detail::bf16_dot_available;
        REQUIRE((got_dot[0] == want) == !dot_ran);
      }
    }
  const matrix w = random_matrix(4, 4, rng);
  CHECK_THROWS_AS(runtime::detail::panel_matrix(w.data(), 4, 4, 4, {}, dtype::f16), config_error);
  const matrix cut = random_matrix(3 * gemm_nr, 8, rng);  // project's tasks do not stop at cuts, so it refuses them
  CHECK_THROWS_AS(runtime::project(random_matrix(2, 8, rng), runtime::detail::panel_matrix(cut.data(), 8, cut.rows(), 8, {gemm_nr + 3})), shape_error);
}

TEST_CASE("project writes into a caller's matrix, keeping its storage when it holds as many values, and refuses its input") {
  std::mt19937 rng(27);
  const matrix w = random_matrix(40, 19, rng);
  const runtime::detail::panel_matrix p(w.data(), w.outerStride(), 40, 19, {}, dtype::bf16);
  const matrix x = random_matrix(5, 19, rng, 1.0f);
  matrix out = matrix::Constant(40, 5, 7.0f);  // 200 values in another shape
  const float* storage = out.data();
  runtime::project(x, p, out);
  CHECK(out.data() == storage);
  CHECK(out == runtime::project(x, p));
  matrix small(1, 1);
  runtime::project(x, w, small);
  CHECK(small == runtime::project(x, w));
  matrix square = random_matrix(19, 19, rng);
  CHECK_THROWS_AS(runtime::project(square, square, square), config_error);
  CHECK_THROWS_AS(runtime::project(square.bottomRows(3), p, square), config_error);
}

TEST_CASE("project over several weights of one input gives each product its own result, bit for bit, and refuses an output given twice") {
  using runtime::detail::gemm_nr;
  std::mt19937 rng(29);
  const index_t depth = 301;
  // Q, K, V shaped: a BF16 product wider than a task, a narrower F32 one,
  // and row-major weights packed per call; empty products too.
  // (V wider than a task: its later tasks start past its first row.)
  const matrix wq = random_matrix(5 * gemm_nr + 3, depth, rng), wk = random_matrix(gemm_nr - 1, depth, rng), wv = random_matrix(9 * gemm_nr + 7, depth, rng);
  const runtime::detail::panel_matrix q_panels(wq.data(), wq.outerStride(), wq.rows(), depth, {}, dtype::bf16),
      k_panels(wk.data(), wk.outerStride(), wk.rows(), depth, {}, dtype::f32);
  const matrix none(0, depth);
  for (index_t t : {0, 1, 5, 33, 100}) {
    INFO("tokens " << t);
    const matrix x = random_matrix(t, depth, rng, 1.0f);
    const auto got = for_each_thread_count([&] {
      matrix q, k, v, e = matrix::Constant(2, 2, 1.0f);
      runtime::project(x, {runtime::projection(q_panels, q), runtime::projection(k_panels, k), runtime::projection(none, e), runtime::projection(wv, v)});
      REQUIRE((e.rows() == t && e.cols() == 0));
      return std::vector<matrix>{q, k, v};
    });
    const std::vector<matrix> want{runtime::project(x, q_panels), runtime::project(x, k_panels), runtime::project(x, wv)};
    for (const auto& g : got)
      for (std::size_t i = 0; i < want.size(); ++i) REQUIRE((g[i].rows() == t && g[i].cols() == want[i].cols() && g[i] == want[i]));
  }
  // Refused before any output is touched.
  const matrix x = random_matrix(3, depth, rng, 1.0f);
  matrix out = matrix::Constant(2, 2, 5.0f), other = out, w = wk;
  const matrix kept = out;
  CHECK_THROWS_AS(runtime::project(x, {runtime::projection(wv, other), runtime::projection(wk, out), runtime::projection(wq, out)}), config_error);
  CHECK_THROWS_AS(runtime::project(x, {runtime::projection(wv, other), runtime::projection(random_matrix(4, depth + 1, rng), out)}), shape_error);
  CHECK_THROWS_AS(runtime::project(x, {runtime::projection(w, out), runtime::projection(wv, w)}), config_error);
  matrix square = random_matrix(depth, depth, rng);
  CHECK_THROWS_AS(runtime::project(square, {runtime::projection(wv, other), runtime::projection(wk, square)}), config_error);
  CHECK((out == kept && other == kept && w == wk));
}

TEST_CASE("BF16 panels round every weight to nearest even, through ties, subnormals, overflow, infinities and NaN") {
  using runtime::detail::gemm_nr;
  std::mt19937 rng(26);
  const float tie_down = 1.0f + std::ldexp(1.0f, -8), tie_up = 1.0f + 3 * std::ldexp(1.0f, -8);
  const float special[] = {tie_down, -tie_up, std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min(),
                           -std::ldexp(1.5f, -140), -0.0f, std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::quiet_NaN()};
  // Known results, not computed by the code under test: ties go to the even
  // neighbour, the largest float overflows to infinity, a NaN stays one with its sign.
  CHECK(f32_to_bf16(tie_down) == 0x3f80);
  CHECK(f32_to_bf16(tie_up) == 0x3f82);
  CHECK(f32_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);
  // Depth 300 crosses a depth block; rows fill two panels and part of a third.
  const index_t rows = 2 * gemm_nr + 3, depth = 300;
  matrix w = random_matrix(rows, depth, rng);
  std::uniform_int_distribution<std::size_t> pick(0, std::size(special) - 1);
  for (index_t i = 0; i < w.size(); i += 3) w.data()[i] = special[pick(rng)];
  const runtime::detail::panel_matrix p(w.data(), w.outerStride(), rows, depth, {}, dtype::bf16);
  for (index_t r = 0; r < rows; ++r) {
    const auto [panel, lane] = p.locate(r);
    for (index_t k = 0; k < depth; ++k) {
      INFO("row " << r << " depth " << k << " value " << w(r, k));
      REQUIRE(p.at<bfloat16>(panel, k)[runtime::detail::bf16_slot(lane)].bits == f32_to_bf16(w(r, k)));
    }
  }
  for (index_t k = 0; k < depth; ++k)
    for (index_t lane = 3; lane < gemm_nr; ++lane) REQUIRE(p.at<bfloat16>(2, k)[runtime::detail::bf16_slot(lane)].bits == 0);  // padding rows
}

TEST_CASE("panels packed from a file's F32, BF16 or F16 bytes at any alignment equal panels of the same values in F32; a NaN is named") {
  using runtime::detail::gemm_nr;
  using runtime::detail::panel_matrix;
  std::mt19937 rng(27);
  const index_t rows = gemm_nr + 5, depth = 301, ld = depth + 3;  // a partial panel, two depth blocks, rows apart by more than their depth
  for (const auto stored : {dtype::f32, dtype::bf16, dtype::f16})
    for (const std::size_t misalign : {std::size_t(0), std::size_t(1)}) {
      CAPTURE(dtype_name(stored), misalign);
      // The values as stored, and as F32 (what reading the file first gives).
      matrix values = random_matrix(rows, ld, rng);
      std::vector<char> bytes(misalign + std::size_t(values.size()) * dtype_size(stored));
      const auto put = [&](index_t r, index_t c, float v) {
        const std::uint16_t h = stored == dtype::bf16 ? f32_to_bf16(v) : f32_to_f16(v);
        std::memcpy(bytes.data() + misalign + std::size_t(r * ld + c) * dtype_size(stored), stored == dtype::f32 ? static_cast<const void*>(&v) : &h,
                    dtype_size(stored));
        return stored == dtype::f32 ? v : stored == dtype::bf16 ? bf16_to_f32(h) : f16_to_f32(h);
      };
      for (index_t r = 0; r < rows; ++r)
        for (index_t c = 0; c < ld; ++c) values(r, c) = put(r, c, values(r, c));
      const runtime::detail::weight_rows file{bytes.data() + misalign, stored, ld, "tensor 'w'"};
      for (const auto type : {dtype::f32, dtype::bf16}) {
        const panel_matrix want(values.data(), ld, rows, depth, {gemm_nr - 3}, type), got(file, rows, depth, {gemm_nr - 3}, type);
        REQUIRE(got.bytes() == want.bytes());
        REQUIRE(std::memcmp(got.storage(), want.storage(), got.bytes()) == 0);
      }
      // A NaN and an infinity: the first in row-major order is named with its place.
      put(gemm_nr + 2, 3, std::numeric_limits<float>::infinity());
      put(gemm_nr + 1, 290, std::numeric_limits<float>::quiet_NaN());
      CHECK_THROWS_MATCHES(panel_matrix(file, rows, depth, {}, dtype::bf16), value_error,
                           Catch::Matchers::Message("moeforge: tensor 'w': non-finite value nan at [" + std::to_string(gemm_nr + 1) + ", 290]"));
      put(gemm_nr + 1, 290, 0.0f);
      CHECK_THROWS_MATCHES(panel_matrix(file, rows, depth, {}, dtype::f32), value_error,
                           Catch::Matchers::Message("moeforge: tensor 'w': non-finite value inf at [" + std::to_string(gemm_nr + 2) + ", 3]"));
      put(gemm_nr + 2, depth, std::numeric_limits<float>::infinity());  // past the depth: not a weight
      put(gemm_nr + 2, 3, 1.0f);
      CHECK_NOTHROW(panel_matrix(file, rows, depth, {}, dtype::f32));
    }
}

TEST_CASE("token panels cover a product's tokens once, in order, at most MR each, a short tail shared by two; BF16 pairs evenly") {
  using runtime::detail::gemm_mr;
  using runtime::detail::gemm_pair_rows;
  const auto cut = [](index_t m, bool pairs = false) {
    const runtime::detail::token_panels tp{m, pairs};
    std::vector<index_t> rows;
    index_t next = 0;
    for (index_t ip = 0; ip < tp.count(); ++ip) {
      REQUIRE(tp.start(ip) == next);
      for (index_t t = next; t < next + tp.rows(ip); ++t) REQUIRE(tp.panel_of(t) == ip);
      rows.push_back(tp.rows(ip));
      next += tp.rows(ip);
    }
    REQUIRE(next == m);
    return rows;
  };
  for (index_t m = 1; m <= 4 * gemm_mr + 3; ++m) {
    INFO("m " << m);
    const std::vector<index_t> rows = cut(m);
    REQUIRE(index_t(rows.size()) == (m + gemm_mr - 1) / gemm_mr);  // as many panels as whole ones would take
    for (std::size_t ip = 0; ip + 2 < rows.size(); ++ip) CHECK(rows[ip] == gemm_mr);
    for (const index_t r : rows) CHECK((r >= 1 && r <= gemm_mr));
    // The last two: whole and short, or both short enough to read two weight panels side by side, one apart.
    if (rows.size() >= 2 && rows[rows.size() - 2] < gemm_mr) {
      CHECK(rows[rows.size() - 2] <= gemm_pair_rows);
      CHECK((rows[rows.size() - 2] - rows.back() == 0 || rows[rows.size() - 2] - rows.back() == 1));
    }
    // BF16 pairs: as few panels of at most gemm_pair_rows as hold them, longer ones first, one token apart.
    const std::vector<index_t> pairs = cut(m, true);
    REQUIRE(index_t(pairs.size()) == (m + gemm_pair_rows - 1) / gemm_pair_rows);
    CHECK(pairs.front() <= gemm_pair_rows);
    CHECK(pairs.front() - pairs.back() <= 1);
    CHECK(std::is_sorted(pairs.rbegin(), pairs.rend()));
  }
  if (gemm_mr == 8 && gemm_pair_rows == 6) {  // AVX-512
    CHECK(cut(9) == std::vector<index_t>{5, 4});
    CHECK(cut(12) == std::vector<index_t>{6, 6});
    CHECK(cut(13) == std::vector<index_t>{8, 5});
    CHECK(cut(16) == std::vector<index_t>{8, 8});
    CHECK(cut(17) == std::vector<index_t>{8, 5, 4});
    CHECK(cut(33) == std::vector<index_t>{8, 8, 8, 5, 4});
    CHECK(cut(9, true) == std::vector<index_t>{5, 4});
    CHECK(cut(16, true) == std::vector<index_t>{6, 5, 5});
    CHECK(cut(33, true) == std::vector<index_t>{6, 6, 6, 5, 5, 5});
  } else {  // AVX2 and plain C++: MR 6, two tokens side by side, never shared
    CHECK(cut(7) == std::vector<index_t>{6, 1});
    CHECK(cut(8) == std::vector<index_t>{6, 2});
    CHECK(cut(13) == std::vector<index_t>{6, 6, 1});
  }
}

TEST_CASE("BF16 token pairs round every token alike, in whole and partial panels, subnormals flushed") {
  using runtime::detail::gemm_mr;
  std::mt19937 rng(26);
  for (index_t count : {index_t(1), gemm_mr - 1, gemm_mr, gemm_mr + 1, 2 * gemm_mr + 4})
    for (index_t kl : {1, 17, 256}) {
      matrix x = random_matrix(count, kl, rng, 1.0f);
      for (index_t t = 0; t < count; ++t) x(t, (3 * t) % kl) = (t % 2 ? -1.0f : 1.0f) * 1e-40f;  // an F32 subnormal
      std::vector<const float*> rows;
      for (index_t t = 0; t < count; ++t) rows.push_back(x.row(t).data());
      const index_t pairs = (kl + 1) / 2, panels = (count + gemm_mr - 1) / gemm_mr;
      std::vector<std::uint32_t> got(std::size_t(panels * pairs * gemm_mr), 0xdeadbeef);
      runtime::detail::pack_token_pairs(rows.data(), count, 0, kl, got.data());
      INFO("count " << count << " depth " << kl);
      for (index_t t = 0; t < panels * gemm_mr; ++t)
        for (index_t j = 0; j < pairs; ++j) {
          const auto value = [&](index_t k) { return t < count && k < kl ? runtime::detail::bf16_token(x(t, k)) : 0u; };
          REQUIRE(got[std::size_t((t / gemm_mr * pairs + j) * gemm_mr + t % gemm_mr)] == (value(2 * j) | value(2 * j + 1) << 16));
        }
    }
}

TEST_CASE("a product reads tokens packed once (F32 panels or BF16 pairs) as it reads the tokens it packs itself, bit for bit") {
  // BF16 weights round their tokens into pairs where the CPU has vdpbf16ps
  // (without it, the exact path: F32 panels past gemm_tokens_in_place, else
  // in place); F32 weights pack F32 panels past gemm_tokens_in_place. The
  // packing handed over holds another matrix's tokens than the rows beside
  // it, so the result shows which were read; it runs on two threads, as
  // run_jobs does.
  using namespace runtime::detail;
  std::mt19937 rng(42);
  const auto row_pointers = [](const matrix& x) {
    std::vector<const float*> rows;
    for (index_t t = 0; t < x.rows(); ++t) rows.push_back(x.row(t).data());
    return rows;
  };
  for (const dtype type : {dtype::bf16, dtype::f32})
    for (index_t depth : {gemm_kc + 45, gemm_kc * 2}) {  // odd and across depth blocks, and whole blocks
      const matrix w = random_matrix(2 * gemm_nr + 13, depth, rng, 1.0f);
      const panel_matrix panels(w.data(), w.outerStride(), w.rows(), depth, {}, weight_format(type, true));
      // The fewest that round (two panels), three (a shared tail), many (past
      // gemm_tokens_in_place) and past a token block.
      for (index_t m : {bf16_exact_tokens + 1, 2 * gemm_mr + 3, gemm_tokens_in_place + 5, gemm_mc * gemm_mr + 3}) {
        INFO(dtype_name(type) << " depth " << depth << " tokens " << m);
        const matrix x = random_matrix(m, depth, rng, 1.0f), other = random_matrix(m, depth, rng, 1.0f);
        const auto blocks = {panels.block(0, 20, 0), panels.block(20, w.rows() - 20, 0)};
        const token_form form = token_form_of(blocks, m);
        CHECK(form == (type == dtype::bf16 && bf16_dot_available ? token_form::pairs
                       : m > gemm_tokens_in_place                 ? token_form::values
                                                                  : token_form::in_place));
        const auto product = [&](const matrix& tokens, const prepacked_tokens& given) {
          matrix out(m, w.rows());
          panel_product(blocks, row_pointers(tokens).data(), m, depth, out.data(), out.outerStride(), given);
          return out;
        };
        token_storage storage;
        prepacked_tokens packed;
        std::vector<token_panel_fill> todo;
        const auto other_rows = row_pointers(other);
        storage.add(other_rows.data(), m, depth, form, true, packed, todo);
        storage.place();
        with_threads(2, [&] {
#pragma omp parallel
          pack_token_panels(todo);
          return 0;
        });
        REQUIRE(product(x, packed) == product(form == token_form::in_place ? x : other, {}));
        // A packing made for another token count or depth is not read.
        prepacked_tokens stale = packed;
        stale.m = m + 1;
        CHECK(product(x, stale) == product(x, {}));
        stale = packed;
        stale.k = depth - 1;
        CHECK(product(x, stale) == product(x, {}));
      }
    }
}

TEST_CASE("an expert's activations packed once for its down product (BF16 pairs, F32 panels) are what the product packs itself, across cuts") {
  // The router's one expert, of 231 neurons, takes every token with weight
  // 1, so the layer's output is the expert's down product alone: what
  // panel_product gives from the expert's panels, packing its own tokens,
  // over activations computed in the same way. A cut at 101 (the major width,
  // where the panels restart) makes the minor part's phase-1 tasks start at
  // an odd neuron, inside a pair of the down product's depth. (Without
  // vdpbf16ps nothing is rounded: the same equality on the exact path.)
  // F32 weights pack F32 panels past gemm_tokens_in_place tokens.
  using namespace runtime::detail;
  std::mt19937 rng(61);
  layer_spec s;
  s.hidden = 333;
  s.widths = {231};
  for (const dtype type : {dtype::bf16, dtype::f32})
    for (const index_t cut : {index_t(0), index_t(101)}) {
      moe_layer m = random_layer(s, rng);
      m.router.top_k = 1;
      m.experts[0].major = cut;
      const runtime::prepared_moe prepared = runtime::prepare(m, type);
      const packed_ffn& panels = prepared.packed().experts[0];
      const index_t width = m.experts[0].width();
      for (const index_t t : {bf16_exact_tokens + 3, index_t(64), index_t(300)}) {
        INFO(dtype_name(type) << " cut " << cut << " tokens " << t);
        const matrix x = random_matrix(t, s.hidden, rng, 1.0f);
        std::vector<const float*> rows;
        for (index_t r = 0; r < t; ++r) rows.push_back(x.row(r).data());
        matrix h(t, width), want(t, s.hidden);
        // Gate and up part by part: a product's blocks never cross the panels' restart.
        const std::vector<index_t> bounds = cut > 0 ? std::vector<index_t>{0, cut, width} : std::vector<index_t>{0, width};
        for (std::size_t part = 0; part + 1 < bounds.size(); ++part) {
          const index_t first = bounds[part], count = bounds[part + 1] - first;
          matrix gate_up(t, 2 * count);
          panel_product({panels.gate.block(first, count, 0), panels.up.block(first, count, 0)}, rows.data(), t, s.hidden, gate_up.data(),
                        gate_up.outerStride());
          for (index_t r = 0; r < t; ++r) activate_row(panels.act, gate_up.row(r).data(), gate_up.row(r).data() + count, h.row(r).data() + first, count);
        }
        std::vector<const float*> h_rows;
        for (index_t r = 0; r < t; ++r) h_rows.push_back(h.row(r).data());
        panel_product({panels.down.block(0, s.hidden, 0)}, h_rows.data(), t, width, want.data(), want.outerStride());
        const auto plan = runtime::route(m, x);  // the softmax of one expert: weight 1 for every token
        const auto got = for_each_thread_count([&] {
          matrix y(t, s.hidden);
          runtime::moe_forward(prepared, plan, x, y);
          return y;
        });
        for (std::size_t i = 0; i < got.size(); ++i) {
          INFO("threads " << i + 1);
          REQUIRE(got[i] == want);
        }
      }
    }
}

/// Requires call(x) to give the same result before and after every thread
/// of a team (of 2, then 3) has run call(other) of its own: what a call
/// keeps in its thread's scratch must not leak into the next top-level one.
template <class Call>
void require_same_after_team_calls(Call call, const matrix& x, const matrix& other) {
  const auto run = [&] {
    const matrix first = call(x);
#pragma omp parallel
    { const matrix inner = call(other); }
    return first == call(x);
  };
  REQUIRE(with_threads(2, run));
  REQUIRE(with_threads(3, run));
}

TEST_CASE("a BF16 projection gives the same result at top level after every thread of a team has run one of its own") {
  // The tokens rounded once per call live in the calling thread's scratch;
  // the team must read the caller's, not stale pairs of its own.
  using namespace runtime::detail;
  std::mt19937 rng(43);
  const matrix w = random_matrix(1024, 300, rng, 1.0f);
  const panel_matrix panels(w.data(), w.outerStride(), w.rows(), w.cols(), {}, weight_format(dtype::bf16, true));
  require_same_after_team_calls([&](const matrix& in) { return runtime::project(in, panels); }, random_matrix(64, 300, rng, 1.0f),
                                 random_matrix(96, 300, rng, 1.0f));
}

TEST_CASE("a MoE layer gives the same result at top level after every thread of a team has run one of its own") {
  // The activations live in the calling thread's scratch, kept between
  // calls; the team must write and read the caller's, not its own.
  std::mt19937 rng(44);
  layer_spec s;
  s.hidden = 256, s.widths = {300, 200, 260, 310}, s.shared = 1;
  const moe_layer m = random_layer(s, rng);
  const runtime::prepared_moe prepared = runtime::prepare(m, dtype::bf16);
  require_same_after_team_calls([&](const matrix& in) { return runtime::moe_forward(prepared, in); }, random_matrix(64, s.hidden, rng, 1.0f),
                                 random_matrix(24, s.hidden, rng, 1.0f));
}

TEST_CASE("a transformer that owns its weights runs prepared FFNs with the same logits as one that refers to them") {
  std::mt19937 rng(24);
  model::weights w;
  auto& c = w.config;
  c.dim = 96, c.n_layers = 2, c.n_heads = 4, c.n_kv_heads = 2, c.head_dim = 24, c.vocab_size = 50, c.seq_len = 16;
  w.tok_emb = random_matrix(c.vocab_size, c.dim, rng, 1.0f);
  w.final_norm = vector::Ones(c.dim);
  for (index_t l = 0; l < c.n_layers; ++l) {
    model::layer x;
    x.attn_norm = x.ffn_norm = vector::Ones(c.dim);
    x.wq = random_matrix(c.n_heads * c.head_dim, c.dim, rng, 0.1f);
    x.wk = x.wv = random_matrix(c.n_kv_heads * c.head_dim, c.dim, rng, 0.1f);
    x.wo = random_matrix(c.dim, c.n_heads * c.head_dim, rng, 0.1f);
    w.layers.push_back(std::move(x));
  }
  w.layers[0].ffn = random_ffn(c.dim, 75, rng);
  layer_spec s;
  s.hidden = c.dim;
  s.widths = {70, 45, 81};
  s.shared = 1;
  moe_layer m = random_layer(s, rng);
  m.router.top_k = 2;
  m.router.drop = {drop_kind::two_t, 0.4f, 0.05f, {}};
  w.layers[1].ffn = std::move(m);
  // In BF16 with F32 tokens (the 7-token prompt would round them otherwise)
  // the owning transformer computes what the plain one computes on the
  // weights rounded to BF16; the norms, the router and the embedding lookup
  // stay F32 (so the rounded copy unties its classifier).
  model::weights rounded = w;
  for (auto& l : rounded.layers) {
    for (matrix* m : {&l.wq, &l.wk, &l.wv, &l.wo}) *m = rounded_to_bf16(*m);
    if (auto* f = std::get_if<ffn>(&l.ffn)) round_to_bf16(*f);
    if (auto* m = std::get_if<moe_layer>(&l.ffn)) {
      for (auto& ex : m->experts) round_to_bf16(ex.weights);
      for (auto& sh : m->shared) round_to_bf16(sh.weights);
    }
  }
  rounded.config.tied_embeddings = false;
  rounded.lm_head = rounded_to_bf16(w.tok_emb);
  const model::transformer plain(w), plain_rounded(rounded);
  const model::transformer owning{model::weights(w)}, owning_bf16{model::weights(w), runtime::detail::weight_format{dtype::bf16, false}};
  // The MoE layer scores tokens from its router's panels (F32 in both).
  for (const auto* t : {&owning, &owning_bf16}) {
    CHECK(t->packed().ffn[1].router.weight.rows() == 3);
    CHECK(t->packed().ffn[1].router.weight.type() == dtype::f32);
  }
  const std::vector<std::int32_t> prompt{3, 17, 42, 8, 0, 29, 11};
  for (int threads : {1, 2}) {
    with_threads(threads, [&] {
      auto a = plain.new_cache(), b = owning.new_cache(), c = plain_rounded.new_cache(), d = owning_bf16.new_cache();
      const matrix logits = plain.forward(prompt, a);
      REQUIRE(logits == owning.forward(prompt, b));
      REQUIRE(plain.forward({5}, a) == owning.forward({5}, b));
      const matrix rounded_logits = plain_rounded.forward(prompt, c);
      REQUIRE(rounded_logits != logits);  // the rounding is visible
      REQUIRE(rounded_logits == owning_bf16.forward(prompt, d));
      REQUIRE(plain_rounded.forward({5}, c) == owning_bf16.forward({5}, d));
      return 0;
    });
  }
}
