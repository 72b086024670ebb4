// CMoE on single layers: exactness at full activation (markers: test_markers.cpp),
// structure of the partition, determinism across threads, config validation.
#include <catch2/catch.hpp>

#include <algorithm>
#include <limits>
#include <random>
#include <set>

#include <omp.h>

#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/convert/cmoe.hpp"
#include "moeforge/io/native.hpp"
#include "moeforge/model/eval.hpp"
#include "moeforge/runtime/dense_ffn.hpp"
#include "moeforge/runtime/moe_ffn.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/stories.hpp"
#include "support/temp_dir.hpp"

using namespace moeforge;

namespace {

using test::gaussian;
using test::gaussian_ffn;

convert::cmoe_options options(const std::string& config, index_t ka = 4) {
  convert::cmoe_options o;
  o.config = convert::parse_cmoe_config(config);
  o.ka = ka;
  return o;
}

}  // namespace

TEST_CASE("cmoe at full activation equals the dense FFN") {
  std::mt19937 rng(1);
  const ffn f = gaussian_ffn(32, 48, rng);
  const matrix x = gaussian(300, 32, rng);
  for (const char* config : {"S1A3E4", "S0A4E4", "S2A6E8"}) {
    const auto res = convert::cmoe(f, x, options(config));
    const matrix dense = runtime::dense_forward(f, x);
    const matrix moe = runtime::moe_forward(res.layer, x);
    INFO(config);
    REQUIRE((moe - dense).cwiseAbs().maxCoeff() <= 1e-4f * (1.0f + dense.cwiseAbs().maxCoeff()));
  }
}

TEST_CASE("cmoe partitions the neurons into a shared expert, balanced experts and leftovers") {
  std::mt19937 rng(3);
  const ffn f = gaussian_ffn(24, 50, rng);  // 50 = 8·6 + 2 leftovers
  const matrix x = gaussian(200, 24, rng);
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
  const ffn f = gaussian_ffn(16, 32, rng);
  const matrix x = gaussian(130, 16, rng);
  const auto mk = calib::compute_markers(f, x, 3);
  const auto res = convert::cmoe(f, mk, options("S1A2E4", 3));
  // Initial centroids: the 3 highest-rate routed neurons, one per expert.
  const auto order = calib::neurons_by_rate(mk);
  std::int64_t cost = 0;
  for (const auto& e : res.report.experts) {
    int centroids = 0;
    for (index_t j = 8; j < 11; ++j) {
      if (std::find(e.begin(), e.end(), order[std::size_t(j)]) == e.end()) continue;
      for (index_t i : e) cost += convert::detail::hamming(mk.column(i), mk.column(order[std::size_t(j)]), mk.words);
      ++centroids;
    }
    REQUIRE(centroids == 1);  // each expert holds exactly one initial centroid neuron
  }
  REQUIRE(cost == res.report.assignment_cost);
}

TEST_CASE("cmoe gives the same layer whatever the thread count") {
#ifdef _OPENMP
  std::mt19937 rng(5);
  const ffn f = gaussian_ffn(64, 96, rng);
  const matrix x = gaussian(700, 64, rng);
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
  const ffn f = gaussian_ffn(16, 40, rng);
  const matrix x = gaussian(100, 16, rng);
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
  const ffn f = gaussian_ffn(8, 16, rng);
  const matrix x = gaussian(10, 8, rng);
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
  const ffn f = gaussian_ffn(16, 48, rng);
  const matrix x = gaussian(200, 16, rng);
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
    layer.ffn = gaussian_ffn(16, 24, rng);
    w.layers.push_back(std::move(layer));
  }
  const matrix x = gaussian(100, 16, rng);
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
  layer.ffn = gaussian_ffn(16, 24, rng);
  fresh.layers.push_back(std::move(layer));
  REQUIRE_THROWS_AS(convert::cmoe_model(fresh, inputs, options("S1A1E40")), config_error);
  REQUIRE(std::holds_alternative<ffn>(fresh.layers[0].ffn));
}

namespace {

struct calibrated_stories {
  model::weights w = test::stories_weights();
  const model::tokenizer& tok = test::stories_tokenizer();
  std::vector<std::vector<std::int32_t>> calib = calib::calibration_windows(test::stories_text("tinystories_calib.txt"), 512, 8192);
};

}  // namespace

TEST_CASE("cmoe at full activation keeps stories260K's perplexity", "[slow]") {
  calibrated_stories s;
  const auto eval = test::stories_text("tinystories_eval.txt");
  const double dense = model::perplexity(model::transformer(s.w), eval, 512, 3).ppl;
  convert::cmoe_model(s.w, [&](const model::weights& w, index_t l) { return calib::ffn_inputs(w, l, s.calib); }, options("S1A3E4", 10));
  const double moe = model::perplexity(model::transformer(s.w), eval, 512, 3).ppl;
  REQUIRE(moe == Approx(dense).epsilon(1e-4));
}

TEST_CASE("calibration text shorter than requested is a clear error") {
  REQUIRE_THROWS_WITH(calib::calibration_windows({1, 5, 6}, 512, 8192), Catch::Contains("only 3 tokens but 8192"));
}

// ---------------------------------------------------------------------------
// The reference's numbers on a real model, exactness, determinism and bad input.

namespace {

// Everything that must not depend on the thread count.
void require_identical(const convert::cmoe_result& a, const convert::cmoe_result& b) {
  auto ja = to_json(a.report), jb = to_json(b.report);
  ja.erase("stage_seconds");
  jb.erase("stage_seconds");
  REQUIRE(ja == jb);
  REQUIRE(a.layer.router.kind == b.layer.router.kind);
  REQUIRE(a.layer.router.weight == b.layer.router.weight);
  REQUIRE(a.layer.router.weight_up == b.layer.router.weight_up);
  REQUIRE(a.layer.experts.size() == b.layer.experts.size());
  for (std::size_t e = 0; e < a.layer.experts.size(); ++e) {
    REQUIRE(a.layer.experts[e].weights.gate == b.layer.experts[e].weights.gate);
    REQUIRE(a.layer.experts[e].weights.up == b.layer.experts[e].weights.up);
    REQUIRE(a.layer.experts[e].weights.down == b.layer.experts[e].weights.down);
  }
  REQUIRE(a.layer.shared.size() == b.layer.shared.size());
  for (std::size_t s = 0; s < a.layer.shared.size(); ++s) {
    REQUIRE(a.layer.shared[s].weights.gate == b.layer.shared[s].weights.gate);
    REQUIRE(a.layer.shared[s].weights.down == b.layer.shared[s].weights.down);
  }
}

}  // namespace

TEST_CASE("cmoe reproduces reference.json's assignment cost on stories260K (leftovers dropped, as the reference does)") {
  const auto& ref = test::stories_reference()["cmoe_assignment_cost"];
  const model::weights& w = test::stories_weights();
  const auto layer = ref["layer"].get<index_t>();
  const ffn f = std::get<ffn>(w.layers[std::size_t(layer)].ffn);
  auto o = options(ref["config"].get<std::string>(), ref["ka"].get<index_t>());
  const index_t e = o.config.experts, sh = o.config.shared;
  INFO("I = " << f.intermediate());
  REQUIRE(f.intermediate() % e != 0);  // 172 = 8·21 + 4: the zero-cost sink decides which 4 neurons are left over
  const auto windows = calib::calibration_windows(test::stories_text("tinystories_calib.txt"), 512, ref["calib_tokens"].get<index_t>());
  const matrix x = calib::ffn_inputs(w, layer, windows);
  o.leftover = convert::leftover_policy::drop;
  const auto res = convert::cmoe(f, x, o);
  // The reference's value; it is the unique optimum of its LAP.
  REQUIRE(res.report.assignment_cost == ref["cost"].get<std::int64_t>());
  REQUIRE(res.report.leftovers.size() == std::size_t(f.intermediate() % e));
  REQUIRE(res.report.leftover_fate == "dropped");
  REQUIRE(res.layer.shared[0].weights.intermediate() == sh * (f.intermediate() / e));
  // The leftover policy changes only the leftovers' fate, never the assignment.
  o.leftover = convert::leftover_policy::shared;
  const auto kept = convert::cmoe(f, x, o);
  REQUIRE(kept.report.assignment_cost == res.report.assignment_cost);
  REQUIRE(kept.report.experts == res.report.experts);
  REQUIRE(kept.layer.shared[0].weights.intermediate() == f.intermediate() - (e - sh) * (f.intermediate() / e));
}

TEST_CASE("cmoe at full activation gives stories260K's dense logits", "[slow]") {
  calibrated_stories s;
  const auto tokens = s.tok.encode("Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog.");
  const matrix dense = test::logits(s.w, tokens);
  for (const char* config : {"S1A3E4", "S0A4E4"}) {
    model::weights w = s.w;
    convert::cmoe_model(w, [&](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, s.calib); }, options(config, 10));
    INFO(config);
    REQUIRE((test::logits(w, tokens) - dense).cwiseAbs().maxCoeff() <= 1e-4f);
  }
}

TEST_CASE("cmoe with leftovers given to the shared expert is exact at full activation, for every method") {
  std::mt19937 rng(21);
  const ffn f = gaussian_ffn(32, 50, rng);  // 50 = 8·6 + 2 and 50 = 4·12 + 2
  const matrix x = gaussian(300, 32, rng);
  const matrix dense = runtime::dense_forward(f, x);
  for (auto method : {convert::cmoe_method::cmoe, convert::cmoe_method::random, convert::cmoe_method::param_cluster})
    for (const char* config : {"S2A6E8", "S1A3E4", "S0A8E8"}) {
      auto o = options(config);
      o.method = method;
      o.leftover = convert::leftover_policy::shared;
      const auto res = convert::cmoe(f, x, o);
      INFO(config << " " << convert::method_name(method));
      REQUIRE(res.report.leftovers.size() == 2);
      REQUIRE(res.report.leftover_fate == "shared");
      const matrix moe = runtime::moe_forward(res.layer, x);
      REQUIRE((moe - dense).cwiseAbs().maxCoeff() <= 1e-4f * (1.0f + dense.cwiseAbs().maxCoeff()));
      // Dropping them instead is not exact: the dropped neurons' contribution is missing.
      o.leftover = convert::leftover_policy::drop;
      const matrix dropped = runtime::moe_forward(convert::cmoe(f, x, o).layer, x);
      REQUIRE((dropped - dense).cwiseAbs().maxCoeff() > 1e-3f);
    }
}

TEST_CASE("cmoe, random and param_cluster give identical layers with 1 and 2 threads") {
#ifdef _OPENMP
  std::mt19937 rng(22);
  const ffn f = gaussian_ffn(96, 203, rng);  // leftovers, tokens not a multiple of the block
  const matrix x = gaussian(1300, 96, rng);
  const int saved = omp_get_max_threads();
  for (auto method : {convert::cmoe_method::cmoe, convert::cmoe_method::random, convert::cmoe_method::param_cluster})
    for (const char* config : {"S1A2E8", "S0A3E6"}) {
      auto o = options(config, 7);
      o.method = method;
      o.iterations = 3;
      o.block = 256;
      INFO(config << " " << convert::method_name(method));
      omp_set_num_threads(1);
      const auto a = convert::cmoe(f, x, o);
      omp_set_num_threads(2);
      const auto b = convert::cmoe(f, x, o);
      omp_set_num_threads(saved);
      require_identical(a, b);
    }
  // The markers themselves, bit for bit (the GEMM's reduction order must not depend on the threads).
  omp_set_num_threads(1);
  const auto m1 = calib::compute_markers(f, x, 7, 128);
  omp_set_num_threads(2);
  const auto m2 = calib::compute_markers(f, x, 7, 128);
  omp_set_num_threads(saved);
  REQUIRE(m1.bits == m2.bits);
  REQUIRE(m1.counts == m2.counts);
#else
  FAIL("built without OpenMP: thread-count determinism cannot be checked");
#endif
}

TEST_CASE("cmoe rejects each kind of bad input with a typed error") {
  std::mt19937 rng(23);
  const ffn f = gaussian_ffn(8, 16, rng);
  const matrix x = gaussian(10, 8, rng);
  SECTION("Ns >= N") {
    REQUIRE_THROWS_AS(convert::cmoe(f, x, options("S4A1E4")), config_error);
    REQUIRE_THROWS_AS(convert::cmoe(f, x, options("S5A1E4")), config_error);
  }
  SECTION("Nk > N - Ns, Nk = 0") {
    REQUIRE_THROWS_AS(convert::cmoe(f, x, options("S2A3E4")), config_error);
    REQUIRE_THROWS_AS(convert::cmoe(f, x, options("S0A0E4")), config_error);
  }
  SECTION("N > I") { REQUIRE_THROWS_WITH(convert::cmoe(f, x, options("S0A1E17")), Catch::Contains("only 16 neurons")); }
  SECTION("N = 0") { REQUIRE_THROWS_AS(convert::cmoe(f, x, options("S0A0E0")), config_error); }
  SECTION("K_a > I, K_a < 1, K_a fraction out of range") {
    REQUIRE_THROWS_AS(convert::cmoe(f, x, options("S1A1E4", 17)), config_error);
    REQUIRE_THROWS_AS(convert::cmoe(f, x, options("S1A1E4", -1)), config_error);
    REQUIRE_THROWS_AS(calib::compute_markers(f, x, 17), config_error);
    auto o = options("S1A1E4");
    o.ka_fraction = -0.1;
    REQUIRE_THROWS_AS(convert::cmoe(f, x, o), config_error);
  }
  SECTION("zero calibration tokens") {
    REQUIRE_THROWS_WITH(convert::cmoe(f, matrix(0, 8), options("S1A1E4")), Catch::Contains("zero calibration tokens"));
    REQUIRE_THROWS_AS(calib::compute_markers(f, matrix(0, 8), 2), config_error);
    REQUIRE_THROWS_AS(calib::calibration_windows({1, 2, 3}, 512, 0), config_error);
  }
  SECTION("calibration text shorter than requested") {
    REQUIRE_THROWS_AS(calib::calibration_windows({1, 5, 6}, 512, 4), config_error);
    REQUIRE(calib::calibration_windows({1, 5, 6}, 2, 3).size() == 2);
  }
  SECTION("invalid config strings") {
    for (const char* bad : {"", "S", "S1", "S1A", "S1A1", "S1A1E", "E4", "S1E4A1", "S-1A1E4", "S1 A1E4", "S1A1E4 ", "S1A1E4E4", "S1A1E99999999999"}) {
      INFO("'" << bad << "'");
      REQUIRE_THROWS_AS(convert::parse_cmoe_config(bad), config_error);
    }
    REQUIRE_THROWS_AS(convert::parse_leftover_policy("keep"), config_error);
    REQUIRE_THROWS_AS(convert::parse_cmoe_method("moefication"), config_error);
    REQUIRE(convert::to_string(convert::parse_cmoe_config("S12A3E40")) == "S12A3E40");
  }
  SECTION("a negative shared count (a library caller's; the parser takes digits only)") {
    convert::cmoe_config c{-1, 1, 4};
    REQUIRE_THROWS_WITH(convert::validate(c, 16), Catch::Contains("-1 shared experts"));
  }
  SECTION("NaN or Inf in the calibration inputs or the weights") {
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      matrix noisy = x;
      noisy(7, 3) = bad;
      REQUIRE_THROWS_WITH(convert::cmoe(f, noisy, options("S1A1E4")), Catch::Contains("calibration token 7"));
      REQUIRE_THROWS_AS(calib::compute_markers(f, noisy, 2), value_error);
      ffn broken = f;
      broken.gate(5, 2) = bad;
      REQUIRE_THROWS_WITH(convert::cmoe(broken, x, options("S1A1E4")), Catch::Contains("gate"));
    }
  }
  SECTION("ungated FFN, mismatched markers") {
    ffn plain = f;
    plain.gate.resize(0, 0);
    REQUIRE_THROWS_AS(convert::cmoe(plain, x, options("S1A1E4")), config_error);
    const auto mk = calib::compute_markers(gaussian_ffn(8, 20, rng), x, 2);
    REQUIRE_THROWS_AS(convert::cmoe(f, mk, options("S1A1E4")), shape_error);
  }
}

TEST_CASE("a failed conversion leaves an existing output directory untouched") {
  // The CLI's order: check the output path, convert, and only then save (which
  // replaces a directory only with --force and only once the new model is complete).
  calibrated_stories s;
  const model::weights& w = s.w;
  test::temp_dir tmp;
  const std::string out = tmp / "model";
  io::save_native(w, out, {{"version", "first"}});
  const std::string before = test::file_bytes(out + "/model.safetensors");
  REQUIRE_THROWS_AS(io::check_output_dir(out, false), io_error);
  auto failing = [&](const model::weights& m, index_t l) -> matrix {
    if (l == 1) throw error("calibration forward pass failed: simulated");
    return calib::ffn_inputs(m, l, {s.calib[0]});
  };
  model::weights converted = w;
  auto convert_and_save = [&] {
    convert::cmoe_model(converted, failing, options("S1A1E4", 10));
    io::native_save_options overwrite;
    overwrite.overwrite = true;
    io::save_native(converted, out, {{"version", "second"}}, overwrite);
  };
  const auto require_untouched = [&] {
    REQUIRE(test::file_bytes(out + "/model.safetensors") == before);
    REQUIRE(io::read_native_manifest(out)["provenance"]["version"] == "first");
    REQUIRE(std::distance(std::filesystem::directory_iterator(tmp.path()), {}) == 1);  // no staging directory left
  };
  REQUIRE_THROWS_AS(convert_and_save(), error);
  require_untouched();
  // A save that fails late, after the tensors and manifest are staged (an
  // attachment that cannot be copied), with overwriting allowed.
  io::native_save_options broken;
  broken.overwrite = true;
  broken.attachments.push_back({tmp / "no-such-tokenizer.bin", "tokenizer.bin"});
  REQUIRE_THROWS_WITH(io::save_native(w, out, {{"version", "third"}}, broken), Catch::Contains("no-such-tokenizer.bin"));
  require_untouched();
}

TEST_CASE("param_cluster: balanced groups of normalised gate rows, a centroid_topk router, runs through the kernel") {
  std::mt19937 rng(25);
  const index_t h = 24, n = 64;
  // Four well separated directions: gate rows are noisy copies of them.
  const matrix dirs = gaussian(4, h, rng);
  ffn f = gaussian_ffn(h, n, rng);
  std::normal_distribution<float> noise(0.0f, 0.05f);
  for (index_t i = 0; i < n; ++i)
    for (index_t c = 0; c < h; ++c) f.gate(i, c) = dirs(i % 4, c) * float(1 + i % 3) + noise(rng);
  const matrix x = gaussian(200, h, rng);
  auto o = options("S0A1E4");
  o.method = convert::cmoe_method::param_cluster;
  o.seed = 3;
  const auto res = convert::cmoe(f, x, o);
  const auto& rep = res.report;
  REQUIRE(rep.method == "param_cluster");
  REQUIRE(rep.experts.size() == 4);
  REQUIRE(rep.representatives.empty());
  for (const auto& e : rep.experts) {
    REQUIRE(e.size() == 16);
    // Balanced k-means recovers the directions (scale does not matter after normalisation).
    for (index_t i : e) REQUIRE(i % 4 == e[0] % 4);
  }
  REQUIRE(res.layer.router.kind == router_kind::centroid_topk);
  REQUIRE(res.layer.router.weight.rows() == 4);
  REQUIRE(res.layer.router.weight.cols() == h);
  REQUIRE(res.layer.router.top_k == 1);
  // Centroid j is the mean of its members' normalised gate rows.
  for (index_t j = 0; j < 4; ++j) {
    Eigen::RowVectorXf mean = Eigen::RowVectorXf::Zero(h);
    for (index_t i : rep.experts[std::size_t(j)]) mean += f.gate.row(i).normalized();
    mean /= 16.0f;
    REQUIRE((res.layer.router.weight.row(j) - mean).cwiseAbs().maxCoeff() <= 1e-5f);
  }
  REQUIRE_FALSE(rep.pass_costs.empty());
  for (std::size_t p = 1; p < rep.pass_costs.size(); ++p) REQUIRE(rep.pass_costs[p] <= rep.pass_costs[p - 1] + 1e-9);
  // Through the kernel: finite outputs, and at top-1 each token gets exactly its chosen expert.
  const matrix y = runtime::moe_forward(res.layer, x);
  REQUIRE(y.rows() == x.rows());
  REQUIRE(y.allFinite());
  for (index_t t = 0; t < 5; ++t) {
    index_t best = 0;
    const Eigen::RowVectorXf xn = x.row(t).normalized();
    for (index_t j = 1; j < 4; ++j)
      if (xn.dot(res.layer.router.weight.row(j)) > xn.dot(res.layer.router.weight.row(best))) best = j;
    const matrix expect = runtime::dense_forward(res.layer.experts[std::size_t(best)].weights, x.middleRows(t, 1));
    REQUIRE((y.row(t) - expect).cwiseAbs().maxCoeff() <= 1e-4f * (1.0f + expect.cwiseAbs().maxCoeff()));
  }
  // Seeded: the same seed gives the same layer.
  REQUIRE(convert::cmoe(f, x, o).report.experts == rep.experts);
}

TEST_CASE("param_cluster fills every expert exactly when gate rows coincide (dead neurons, duplicates) — the assignment's costs are integers") {
  // Equal rows make exchange cycles of zero cost; rounded floating-point
  // differences made some look negative, and one neuron moved twice.
  std::mt19937 rng(11);
  for (int trial = 0; trial < 60; ++trial) {
    INFO("trial " << trial);
    ffn f = gaussian_ffn(16, 64, rng);
    for (index_t i = 0; i < 64; ++i)
      if (rng() % 4 == 0) f.gate.row(i).setZero();
    for (index_t i = 1; i < 64; i += 7) f.gate.row(i) = f.gate.row(i - 1);
    auto o = options("S0A2E8");
    o.method = convert::cmoe_method::param_cluster;
    o.seed = std::uint64_t(trial);
    const auto res = convert::cmoe(f, gaussian(64, 16, rng), o);
    for (const auto& e : res.report.experts) REQUIRE(e.size() == 8);
  }
}

TEST_CASE("cmoe at partial activation: representatives by the paper's rule, their rows as the router, top-A routing by analytic score") {
  std::mt19937 rng(27);
  const ffn f = gaussian_ffn(24, 64, rng);  // S1A2E8: a shared expert and 7 routed ones of 8 neurons
  const matrix x = gaussian(300, 24, rng);
  const auto o = options("S1A2E8", 4);
  const auto res = convert::cmoe(f, x, o);
  const auto& rep = res.report;
  const auto& router = res.layer.router;
  const auto mk = calib::compute_markers(f, x, o.ka);
  REQUIRE(router.kind == router_kind::cmoe_analytic);
  REQUIRE(router.top_k == o.config.active);
  REQUIRE(res.layer.num_experts() == 7);
  for (index_t j = 0; j < res.layer.num_experts(); ++j) {
    INFO("expert " << j);
    const auto& members = rep.experts[std::size_t(j)];
    // The member closest in L1 to the mean of the members' markers, the lower
    // index on ties; times the member count, every distance is an integer.
    const auto m = std::int64_t(members.size());
    std::vector<std::int64_t> marked_members(std::size_t(x.rows()), 0);
    for (index_t i : members)
      for (index_t t = 0; t < x.rows(); ++t) marked_members[std::size_t(t)] += (mk.column(i)[t / 64] >> (t % 64)) & 1u;
    index_t want = -1;
    std::int64_t best = 0;
    for (index_t i : members) {
      std::int64_t d = 0;
      for (index_t t = 0; t < x.rows(); ++t)
        d += std::abs(m * std::int64_t((mk.column(i)[t / 64] >> (t % 64)) & 1u) - marked_members[std::size_t(t)]);
      if (want < 0 || d < best || (d == best && i < want)) want = i, best = d;
    }
    REQUIRE(rep.representatives[std::size_t(j)] == want);
    const Eigen::RowVectorXd g = f.gate.row(want).cast<double>().normalized(), u = f.up.row(want).cast<double>().normalized();
    REQUIRE((router.weight.row(j).cast<double>() - g).cwiseAbs().maxCoeff() < 1e-6);
    REQUIRE((router.weight_up.row(j).cast<double>() - u).cwiseAbs().maxCoeff() < 1e-6);
  }
  // Each token goes to the A experts with the highest |silu(G_j·x)·(U_j·x)|,
  // computed in double, unless the A-th and next are too close to call.
  const auto sel = runtime::select(res.layer, x);
  index_t checked = 0;
  for (index_t t = 0; t < x.rows(); ++t) {
    const auto p = reference::probs(router, x.row(t).data());
    const auto order = reference::top_k(p, res.layer.num_experts());
    const double a = p[std::size_t(order[std::size_t(router.top_k - 1)])], b = p[std::size_t(order[std::size_t(router.top_k)])];
    if (a - b <= 1e-6 * a) continue;
    ++checked;
    std::set<index_t> want(order.begin(), order.begin() + router.top_k), got;
    for (index_t k = 0; k < sel.k; ++k) got.insert(sel.expert[std::size_t(t * sel.k + k)]);
    INFO("token " << t);
    REQUIRE(got == want);
  }
  REQUIRE(checked > x.rows() * 9 / 10);
  // And the layer computes the shared expert plus its selected experts at gate 1.
  const matrix y = runtime::moe_forward(res.layer, x), want = reference::moe(res.layer, x);
  REQUIRE((y - want).cwiseAbs().maxCoeff() <= 1e-4f * (1.0f + want.cwiseAbs().maxCoeff()));
}
