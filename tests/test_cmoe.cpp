// CMoE on single layers: exactness at full activation, marker definition,
// structure of the partition, determinism across threads, config validation.
#include <catch2/catch.hpp>

#include <algorithm>
#include <random>
#include <set>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <fstream>
#include <iterator>

#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/convert/cmoe.hpp"
#include "moeforge/io/llama2c.hpp"
#include "moeforge/model/tokenizer.hpp"
#include "support/data.hpp"
#include "moeforge/runtime/dense_ffn.hpp"
#include "moeforge/runtime/moe_ffn.hpp"

using namespace moeforge;

namespace {

matrix random_matrix(index_t r, index_t c, std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  matrix m(r, c);
  for (index_t i = 0; i < r; ++i)
    for (index_t j = 0; j < c; ++j) m(i, j) = d(rng);
  return m;
}

ffn random_ffn(index_t h, index_t n, std::mt19937& rng) {
  ffn f;
  f.gate = random_matrix(n, h, rng);
  f.up = random_matrix(n, h, rng);
  f.down = random_matrix(h, n, rng) * 0.1f;
  return f;
}

convert::cmoe_options options(const std::string& config, index_t ka = 4) {
  convert::cmoe_options o;
  o.config = convert::parse_cmoe_config(config);
  o.ka = ka;
  return o;
}

}  // namespace

TEST_CASE("cmoe at full activation equals the dense FFN") {
  std::mt19937 rng(1);
  const ffn f = random_ffn(32, 48, rng);
  const matrix x = random_matrix(300, 32, rng);
  for (const char* config : {"S1A3E4", "S0A4E4", "S2A6E8"}) {
    const auto res = convert::cmoe(f, x, options(config));
    const matrix dense = runtime::dense_forward(f, x);
    const matrix moe = runtime::moe_forward(res.layer, x);
    INFO(config);
    REQUIRE((moe - dense).cwiseAbs().maxCoeff() <= 1e-4f * (1.0f + dense.cwiseAbs().maxCoeff()));
  }
}

TEST_CASE("cmoe markers are each token's top-K_a neurons by |silu(x̂·ĝ)·(x̂·û)|") {
  std::mt19937 rng(2);
  const ffn f = random_ffn(16, 40, rng);
  const matrix x = random_matrix(150, 16, rng);  // not a multiple of 64 or of the block
  const index_t ka = 5;
  const auto mk = calib::compute_markers(f, x, ka, 64);
  REQUIRE(mk.tokens == 150);
  REQUIRE(mk.words == 3);
  for (index_t t = 0; t < x.rows(); ++t) {
    const Eigen::VectorXd xv = x.row(t).cast<double>().normalized();
    std::vector<std::pair<double, index_t>> h;
    for (index_t i = 0; i < 40; ++i) {
      const double a = xv.dot(f.gate.row(i).cast<double>().normalized());
      const double b = xv.dot(f.up.row(i).cast<double>().normalized());
      h.push_back({-std::abs(a / (1.0 + std::exp(-a)) * b), i});
    }
    std::sort(h.begin(), h.end());
    std::set<index_t> top;
    for (index_t j = 0; j < ka; ++j) top.insert(h[std::size_t(j)].second);
    for (index_t i = 0; i < 40; ++i) {
      const bool marked = (mk.column(i)[t / 64] >> (t % 64)) & 1u;
      REQUIRE(marked == (top.count(i) == 1));
    }
  }
  index_t total = 0;
  for (index_t c : mk.counts) total += c;
  REQUIRE(total == 150 * ka);
}

TEST_CASE("cmoe partitions the neurons into a shared expert, balanced experts and leftovers") {
  std::mt19937 rng(3);
  const ffn f = random_ffn(24, 50, rng);  // 50 = 8·6 + 2 leftovers
  const matrix x = random_matrix(200, 24, rng);
  for (auto fate : {convert::leftover_policy::drop, convert::leftover_policy::shared}) {
    auto o = options("S3A3E8");
    o.leftover = fate;
    const auto res = convert::cmoe(f, x, o);
    const auto& rep = res.report;
    REQUIRE(rep.per_expert == 6);
    REQUIRE(rep.leftovers.size() == 2);
    REQUIRE(rep.experts.size() == 5);
    REQUIRE(res.layer.shared.size() == 1);
    REQUIRE(res.layer.shared[0].weights.intermediate() == (fate == convert::leftover_policy::drop ? 18 : 20));
    std::multiset<index_t> all(rep.shared.begin(), rep.shared.end());
    if (fate == convert::leftover_policy::drop) all.insert(rep.leftovers.begin(), rep.leftovers.end());
    for (std::size_t e = 0; e < rep.experts.size(); ++e) {
      REQUIRE(rep.experts[e].size() == 6);
      REQUIRE(std::count(rep.experts[e].begin(), rep.experts[e].end(), rep.representatives[e]) == 1);
      all.insert(rep.experts[e].begin(), rep.experts[e].end());
      // Expert weights are the original rows, in the reported order.
      for (std::size_t r = 0; r < 6; ++r) REQUIRE(res.layer.experts[e].weights.up.row(index_t(r)) == f.up.row(rep.experts[e][r]));
    }
    REQUIRE(all.size() == 50);
    REQUIRE(std::set<index_t>(all.begin(), all.end()).size() == 50);
    // The shared neurons are the most often marked ones.
    std::vector<index_t> counts;
    const auto mk = calib::compute_markers(f, x, 4);
    index_t min_shared = 1 << 30, max_routed = 0;
    for (index_t i : rep.shared)
      if (std::find(rep.leftovers.begin(), rep.leftovers.end(), i) == rep.leftovers.end()) min_shared = std::min(min_shared, mk.counts[std::size_t(i)]);
    for (const auto& e : rep.experts)
      for (index_t i : e) max_routed = std::max(max_routed, mk.counts[std::size_t(i)]);
    REQUIRE(min_shared >= max_routed);
    REQUIRE(to_json(rep)["leftovers"]["fate"] == (fate == convert::leftover_policy::drop ? "dropped" : "shared"));
  }
}

TEST_CASE("cmoe assignment cost is the sum of Hamming distances to the initial centroids") {
  std::mt19937 rng(4);
  const ffn f = random_ffn(16, 32, rng);
  const matrix x = random_matrix(130, 16, rng);
  const auto mk = calib::compute_markers(f, x, 3);
  const auto res = convert::cmoe(f, mk, options("S1A2E4", 3));
  // Initial centroids: the 3 highest-rate routed neurons, one per expert.
  const auto order = calib::neurons_by_rate(mk);
  std::int64_t best_any = 0, cost = 0;
  for (const auto& e : res.report.experts) {
    std::int64_t best = -1;
    for (index_t j = 8; j < 11; ++j) {
      if (std::find(e.begin(), e.end(), order[std::size_t(j)]) == e.end()) continue;
      for (index_t i : e) cost += convert::detail::hamming(mk.column(i), mk.column(order[std::size_t(j)]), mk.words);
      best = j;
    }
    REQUIRE(best >= 0);  // each expert holds exactly one initial centroid neuron
    (void)best_any;
  }
  REQUIRE(cost == res.report.assignment_cost);
}

TEST_CASE("cmoe gives the same layer whatever the thread count") {
#ifdef _OPENMP
  std::mt19937 rng(5);
  const ffn f = random_ffn(64, 96, rng);
  const matrix x = random_matrix(700, 64, rng);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto a = convert::cmoe(f, x, options("S1A2E8", 6));
  omp_set_num_threads(2);
  const auto b = convert::cmoe(f, x, options("S1A2E8", 6));
  omp_set_num_threads(saved);
  REQUIRE(a.report.experts == b.report.experts);
  REQUIRE(a.report.shared == b.report.shared);
  REQUIRE(a.report.representatives == b.report.representatives);
  REQUIRE(a.report.assignment_cost == b.report.assignment_cost);
  REQUIRE(a.layer.router.weight == b.layer.router.weight);
  REQUIRE(a.layer.router.weight_up == b.layer.router.weight_up);
#else
  FAIL("built without OpenMP: thread-count determinism cannot be checked");
#endif
}

TEST_CASE("cmoe random split is seeded, balanced and uses the analytic router") {
  std::mt19937 rng(6);
  const ffn f = random_ffn(16, 40, rng);
  const matrix x = random_matrix(100, 16, rng);
  auto o = options("S1A1E4");
  o.method = convert::cmoe_method::random;
  o.seed = 9;
  const auto a = convert::cmoe(f, x, o);
  const auto b = convert::cmoe(f, x, o);
  o.seed = 10;
  const auto c = convert::cmoe(f, x, o);
  REQUIRE(a.report.experts == b.report.experts);
  REQUIRE(a.report.experts != c.report.experts);
  for (const auto& e : a.report.experts) REQUIRE(e.size() == 10);
  REQUIRE(a.layer.router.kind == router_kind::cmoe_analytic);
}

TEST_CASE("cmoe rejects bad configurations with config_error") {
  std::mt19937 rng(7);
  const ffn f = random_ffn(8, 16, rng);
  const matrix x = random_matrix(10, 8, rng);
  for (const char* bad : {"S4A1E4", "S1A4E4", "S0A1E17", "S1A0E4", "A1E4", "S1A1E4x", "s1a1e4", "S1A1E"}) {
    INFO(bad);
    REQUIRE_THROWS_AS(convert::cmoe(f, x, options(bad)), config_error);
  }
  REQUIRE_THROWS_AS(convert::cmoe(f, x, options("S1A1E4", 17)), config_error);
  REQUIRE_THROWS_AS(convert::cmoe(f, x, options("S1A1E4", 0)), config_error);
  auto frac = options("S1A1E4");
  frac.ka_fraction = 1.5;
  REQUIRE_THROWS_AS(convert::cmoe(f, x, frac), config_error);
  REQUIRE_THROWS_AS(convert::cmoe(f, matrix(0, 8), options("S1A1E4")), config_error);
  REQUIRE_THROWS_AS(convert::cmoe(f, matrix(5, 7), options("S1A1E4")), shape_error);
}

TEST_CASE("cmoe with more assignment iterations stays balanced") {
  std::mt19937 rng(8);
  const ffn f = random_ffn(16, 48, rng);
  const matrix x = random_matrix(200, 16, rng);
  auto o = options("S0A2E6");
  o.iterations = 3;
  const auto res = convert::cmoe(f, x, o);
  for (const auto& e : res.report.experts) REQUIRE(e.size() == 8);
}

TEST_CASE("cmoe_model converts layers in order, each calibrated on the partly converted model") {
  std::mt19937 rng(9);
  model::weights w;
  w.config.dim = 16;
  for (int l = 0; l < 3; ++l) {
    model::layer layer;
    layer.ffn = random_ffn(16, 24, rng);
    w.layers.push_back(std::move(layer));
  }
  const matrix x = random_matrix(100, 16, rng);
  std::vector<index_t> seen;
  auto inputs = [&](const model::weights& m, index_t l) {
    for (index_t p = 0; p < index_t(m.layers.size()); ++p)
      REQUIRE(std::holds_alternative<moe_layer>(m.layers[std::size_t(p)].ffn) == (p < l));
    seen.push_back(l);
    return matrix(x);
  };
  index_t calls = 0;
  const auto reports = convert::cmoe_model(w, inputs, options("S1A1E4"), [&](const convert::cmoe_model_progress& p) {
    REQUIRE(p.layers == 3);
    ++calls;
  });
  REQUIRE(seen == std::vector<index_t>{0, 1, 2});
  REQUIRE(calls > 0);
  REQUIRE(reports.size() == 3);
  for (const auto& l : w.layers) REQUIRE(std::get<moe_layer>(l.ffn).num_experts() == 3);
  // A bad configuration is rejected before any layer is touched.
  model::weights fresh;
  model::layer layer;
  layer.ffn = random_ffn(16, 24, rng);
  fresh.layers.push_back(std::move(layer));
  REQUIRE_THROWS_AS(convert::cmoe_model(fresh, inputs, options("S1A1E40")), config_error);
  REQUIRE(std::holds_alternative<ffn>(fresh.layers[0].ffn));
}

namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

struct stories {
  model::weights w = io::load_llama2c(test::data_file("models/stories260K/stories260K.bin"));
  model::tokenizer tok = model::load_tokenizer(test::data_file("models/stories260K/tok512.bin"), w.config.vocab_size);
  std::vector<std::vector<std::int32_t>> calib =
      calib::calibration_windows(tok.encode(read_text(test::data_file("data/tinystories_calib.txt"))), 512, 8192);
};

}  // namespace

TEST_CASE("cmoe at full activation keeps stories260K's perplexity") {
  stories s;
  const auto eval = s.tok.encode(read_text(test::data_file("data/tinystories_eval.txt")));
  const double dense = model::perplexity(model::transformer(s.w), eval, 512, 3).ppl;
  convert::cmoe_model(s.w, [&](const model::weights& w, index_t l) { return calib::ffn_inputs(w, l, s.calib); }, options("S1A3E4", 10));
  const double moe = model::perplexity(model::transformer(s.w), eval, 512, 3).ppl;
  REQUIRE(moe == Approx(dense).epsilon(1e-4));
}

TEST_CASE("calibration text shorter than requested is a clear error") {
  REQUIRE_THROWS_WITH(calib::calibration_windows({1, 5, 6}, 512, 8192), Catch::Contains("only 3 tokens but 8192"));
}
