// CMoE's activation markers (calib::compute_markers) against a direct
// double-precision computation. With the kernel tests they are the code whose
// arithmetic depends on the instruction set, so CI also runs this file in
// builds for AVX2 and for no SIMD at all (scripts/test).
#include <catch2/catch.hpp>

#include <algorithm>
#include <random>
#include <set>

#include "moeforge/calib/markers.hpp"
#include "support/random.hpp"
#include "support/threads.hpp"

using namespace moeforge;
using namespace moeforge::test;

namespace {

/// Token t's neurons by |silu(x̂·ĝ_i)·(x̂·û_i)| (unit-norm x, gate and up rows),
/// largest first, ties to the lower index, as (−score, neuron); a zero token
/// scores every neuron 0.
using marker_ranking = std::vector<std::pair<double, index_t>>;
marker_ranking marker_order(const ffn& f, const matrix& x, index_t t) {
  marker_ranking h;
  const double norm = x.row(t).cast<double>().norm();
  const Eigen::VectorXd xv = x.row(t).cast<double>() / (norm == 0 ? 1.0 : norm);
  for (index_t i = 0; i < f.intermediate(); ++i) {
    if (norm == 0) {
      h.push_back({0.0, i});
      continue;
    }
    const double a = xv.dot(f.gate.row(i).cast<double>().normalized());
    const double b = xv.dot(f.up.row(i).cast<double>().normalized());
    h.push_back({-std::abs(a / (1.0 + std::exp(-a)) * b), i});
  }
  std::sort(h.begin(), h.end());
  return h;
}

bool is_marked(const calib::markers& mk, index_t neuron, index_t t) { return (mk.column(neuron)[t / 64] >> (t % 64)) & 1u; }

/// Checks token t's markers are its top-ka neurons (`order`, its
/// marker_order); false (and nothing checked) when the ka-th and next scores
/// are too close for float to rank like double.
bool check_token(const calib::markers& mk, const marker_ranking& order, index_t t, index_t ka) {
  const index_t n = index_t(order.size());
  if (ka < n && order[0].first != 0 &&
      std::abs(order[std::size_t(ka - 1)].first - order[std::size_t(ka)].first) <= 1e-5 * std::abs(order[0].first))
    return false;
  std::set<index_t> top;
  for (index_t j = 0; j < ka; ++j) top.insert(order[std::size_t(j)].second);
  for (index_t i = 0; i < n; ++i) {
    INFO("token " << t << " neuron " << i);
    REQUIRE(is_marked(mk, i, t) == (top.count(i) == 1));
  }
  return true;
}

index_t marker_total(const calib::markers& mk) {
  index_t total = 0;
  for (index_t c : mk.counts) total += c;
  return total;
}

}  // namespace

TEST_CASE("cmoe markers are each token's top-K_a neurons by |silu(x̂·ĝ)·(x̂·û)|") {
  std::mt19937 rng(2);
  const ffn f = gaussian_ffn(16, 40, rng);
  const matrix x = gaussian(150, 16, rng);  // not a multiple of 64 or of the block
  const index_t ka = 5;
  const auto mk = calib::compute_markers(f, x, ka, 64);
  REQUIRE(mk.tokens == 150);
  REQUIRE(mk.words == 3);
  index_t checked = 0;
  for (index_t t = 0; t < x.rows(); ++t) checked += check_token(mk, marker_order(f, x, t), t, ka);
  REQUIRE(checked == x.rows());  // no near-ties on this draw: every token is checked
  REQUIRE(marker_total(mk) == 150 * ka);
}

TEST_CASE("cmoe markers: the blocked GEMM kernel's edges (H past one k block, I past one neuron block, ragged panels), any thread count") {
  std::mt19937 rng(26);
  const index_t h = 600, n = 301;  // 3 k blocks (the last partial), 3 neuron blocks, a last panel of 5 neurons
  const ffn f = gaussian_ffn(h, n, rng);
  matrix x = gaussian(205, h, rng);  // chunks of 64: a ragged last token panel
  x.row(7).setZero();                // a zero input row: every |h| is 0, the top-K_a are the lowest indices
  std::vector<marker_ranking> orders;
  for (index_t t = 0; t < x.rows(); ++t) orders.push_back(marker_order(f, x, t));
  for (index_t ka : {1, 7, 300, 301}) {
    INFO("K_a " << ka);
    const auto mk = calib::compute_markers(f, x, ka, 64);
    index_t checked = 0;
    for (index_t t = 0; t < x.rows(); ++t) checked += check_token(mk, orders[std::size_t(t)], t, ka);
    REQUIRE(checked > x.rows() * 9 / 10);
    REQUIRE(marker_total(mk) == x.rows() * ka);
    // Four chunks of 64 tokens: the blocks really split across 2-4 threads.
    for (const auto& r : for_each_thread_count([&] { return calib::compute_markers(f, x, ka, 64).bits; })) REQUIRE(r == mk.bits);
    // The chunk size changes the work split, never the markers.
    REQUIRE(calib::compute_markers(f, x, ka, 1024).bits == mk.bits);
  }
}

TEST_CASE("markers: a strongly negative gate cosine still wins over a weaker one (|silu| on [-1, 0] reaches 0.2689, above any bound below it)") {
  // x̂ = e1, both up rows along x (x̂·û = 1); gate cosines -0.6 and -1.0:
  // |silu(-0.6)| = 0.6 / (1 + e^0.6) = 0.2124 and |silu(-1)| = 1 / (1 + e) = 0.2689,
  // so with K_a = 1 the token's marker is neuron 1, though neuron 0 is seen first.
  ffn f;
  f.gate.resize(2, 2);
  f.gate << -0.6f, 0.8f, -1.0f, 0.0f;
  f.up.resize(2, 2);
  f.up << 1.0f, 0.0f, 1.0f, 0.0f;
  f.down.resize(2, 2);
  f.down << 1.0f, 0.0f, 0.0f, 1.0f;
  matrix x(1, 2);
  x << 3.0f, 0.0f;
  const calib::markers mk = calib::compute_markers(f, x, 1);
  REQUIRE(mk.counts.size() == 2);
  CHECK(mk.counts[0] == 0);
  CHECK(mk.counts[1] == 1);
}
