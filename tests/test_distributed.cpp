// Expert parallelism over MPI: run by ctest under `mpirun -np 1/2/3`. Every
// rank runs every case and computes the single-process reference itself, so
// all ranks reach the same assertions with the same values (an assertion that
// failed on one rank only would leave the others waiting in a collective).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdlib>
#include <omp.h>
#include <random>

#include "moeforge/convert/cmoe.hpp"
#include "moeforge/distributed/expert_parallel.hpp"
#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/model/eval.hpp"
#include "support/random.hpp"
#include "support/stories.hpp"
#include "support/temp_dir.hpp"

using namespace moeforge;

namespace {

int world_size() { return distributed::comm_size(MPI_COMM_WORLD); }

/// A two-layer model whose FFNs are `layer` (layer 1 a variation of it) around random attention.
model::weights tiny_model(const moe_layer& layer, std::mt19937& rng) {
  model::weights w;
  auto& c = w.config;
  c.dim = layer.hidden();
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 8;
  c.vocab_size = 61;
  c.seq_len = 320;
  w.tok_emb = test::random_matrix(c.vocab_size, c.dim, rng, 1.0f);
  w.final_norm = vector::Ones(c.dim);
  for (int li = 0; li < 2; ++li) {
    model::layer l;
    l.attn_norm = vector::Ones(c.dim);
    l.ffn_norm = vector::Ones(c.dim);
    l.wq = test::random_matrix(16, c.dim, rng);
    l.wk = test::random_matrix(8, c.dim, rng);
    l.wv = test::random_matrix(8, c.dim, rng);
    l.wo = test::random_matrix(c.dim, 16, rng);
    moe_layer m = layer;
    if (li == 1) m.router.weight = test::random_matrix(m.router.weight.rows(), m.router.weight.cols(), rng, 0.3f);
    l.ffn = std::move(m);
    w.layers.push_back(std::move(l));
  }
  return w;
}

std::vector<std::int32_t> some_tokens(index_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& v : t) v = std::int32_t(rng() % 61);
  return t;
}

/// Experts spread over the ranks in an order that is neither contiguous nor by index.
distributed::placement scattered(const model::weights& w, int ranks) {
  auto p = distributed::contiguous_placement(w, ranks);
  for (std::size_t li = 0; li < p.owner.size(); ++li)
    for (std::size_t e = 0; e < p.owner[li].size(); ++e) p.owner[li][e] = int((e * 5 + li * 3 + 1) % std::size_t(ranks));
  return p;
}

bool same_bits(const matrix& a, const matrix& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && std::memcmp(a.data(), b.data(), sizeof(float) * std::size_t(a.size())) == 0;
}

/// Prefill of T = 300 tokens then a T = 1 decode step, single-process and
/// expert-parallel under `p`: both logits must be the same bits.
void require_identical(const model::weights& w, const distributed::placement& p, std::optional<dtype> type = std::nullopt) {
  const auto tokens = some_tokens(300, 7);
  const model::transformer single{model::weights(w), type};
  auto cache = single.new_cache();
  const matrix prefill = single.forward(tokens, cache);
  const matrix decode = single.forward({5}, cache);

  distributed::expert_parallel ep{model::weights(w), p, MPI_COMM_WORLD, type};
  auto ep_cache = ep.model().new_cache();
  const matrix ep_prefill = ep.model().forward(tokens, ep_cache);
  const matrix ep_decode = ep.model().forward({5}, ep_cache);
  REQUIRE(ep.stats().layer_calls == 4);
  REQUIRE(same_bits(prefill, ep_prefill));
  REQUIRE(same_bits(decode, ep_decode));
}

moe_layer spec_layer(router_kind kind, std::mt19937& rng) {
  test::layer_spec s;
  s.hidden = 40;
  s.widths = {13, 20, 7, 31, 16, 9, 24};
  s.kind = kind;
  moe_layer m = test::random_layer(s, rng);
  m.router.top_k = 2;
  if (kind == router_kind::linear_topk || kind == router_kind::quadratic_topk) m.router.bias = test::random_matrix(7, 1, rng);
  if (kind == router_kind::quadratic_topk) {
    m.router.projection = test::random_matrix(3, s.hidden, rng);
    m.router.projection_bias = test::random_matrix(3, 1, rng);
    m.router.weight_quad = test::random_matrix(7, 6, rng, 0.1f);
  }
  return m;
}

}  // namespace

TEST_CASE("expert-parallel logits are the single-process bits for every router kind, T = 300 and T = 1") {
  for (const router_kind kind : all_router_kinds) {
    std::mt19937 rng(11);
    const auto w = tiny_model(spec_layer(kind, rng), rng);
    INFO(router_kind_name(kind));
    require_identical(w, distributed::contiguous_placement(w, world_size()));
    require_identical(w, scattered(w, world_size()));
  }
}

TEST_CASE("expert-parallel logits are the single-process bits with shared experts, novices and compensation") {
  std::mt19937 rng(12);
  test::layer_spec s;
  s.hidden = 40;
  s.widths = {13, 20, 7, 31, 16, 9};
  s.shared = 2;
  s.shared_gate = true;
  s.novices = {1, 4};
  moe_layer m = test::random_layer(s, rng);
  m.router.top_k = 3;
  m.compensation.means = test::random_matrix(6, s.hidden, rng, 0.05f);
  m.compensation.bias = m.compensation.means.colwise().sum().transpose();
  const auto w = tiny_model(m, rng);
  require_identical(w, scattered(w, world_size()));
}

TEST_CASE("expert-parallel logits are the single-process bits with dropped and major-only pairs, in F32 and BF16") {
  std::mt19937 rng(13);
  moe_layer m = spec_layer(router_kind::softmax_topk, rng);
  m.router.top_k = 3;
  m.router.drop = {drop_kind::two_t, 0.3f, 0.1f, {1.0f, 0.6f, 1.0f, 0.8f, 1.0f, 1.0f, 0.5f}};
  m.experts[3].parts = {10, 20};
  m.experts[1].major = 12;
  const auto w = tiny_model(m, rng);
  // The policy must produce all three kinds of pair on these tokens, or the case proves little.
  const auto sel = runtime::select(m, test::random_matrix(300, 40, rng, 1.0f));
  REQUIRE(std::count(sel.work.begin(), sel.work.end(), runtime::pair_work::major) > 0);
  REQUIRE(std::count(sel.work.begin(), sel.work.end(), runtime::pair_work::dropped) > 0);
  SECTION("f32") { require_identical(w, scattered(w, world_size())); }
  SECTION("bf16") { require_identical(w, distributed::contiguous_placement(w, world_size()), dtype::bf16); }
}

TEST_CASE("expert-parallel logits are the single-process bits when the output rows span several tasks") {
  // hidden 272: 5 row tasks at T = 1, 2 at T = 300 (the last one partial), so
  // parts are written and summed at row offsets other than 0.
  std::mt19937 rng(18);
  test::layer_spec s;
  s.hidden = 272;
  s.widths = {24, 40, 16, 33, 20, 28};
  s.shared = 1;
  moe_layer m = test::random_layer(s, rng);
  m.router.top_k = 2;
  const auto w = tiny_model(m, rng);
  require_identical(w, scattered(w, world_size()));
}

TEST_CASE("expert-parallel perplexity reports the single-process routing work, with windows run one at a time") {
  std::mt19937 rng(19);
  moe_layer m = spec_layer(router_kind::softmax_topk, rng);
  m.router.drop = {drop_kind::two_t, 0.3f, 0.1f, {}};
  m.experts[1].major = 12;
  const auto w = tiny_model(m, rng);
  const auto stream = some_tokens(200, 9);
  const auto single = model::perplexity(model::transformer{model::weights(w)}, stream, 48);
  distributed::expert_parallel ep{model::weights(w), scattered(w, world_size()), MPI_COMM_WORLD};
  REQUIRE(ep.model().collective());
  // Two threads would run the windows side by side, and the layers' collectives
  // with them, unless perplexity honours collective().
  const int threads = omp_get_max_threads();
  omp_set_num_threads(2);
  const auto parallel = model::perplexity(ep.model(), stream, 48);
  omp_set_num_threads(threads);
  REQUIRE(parallel.windows == single.windows);
  REQUIRE(parallel.nll == single.nll);
  REQUIRE(parallel.layer_work.size() == single.layer_work.size());
  for (std::size_t l = 0; l < single.layer_work.size(); ++l) {
    INFO("layer " << l);
    REQUIRE(parallel.layer_work[l].active_fraction() == single.layer_work[l].active_fraction());
    REQUIRE(parallel.layer_work[l].drop_rate() == single.layer_work[l].drop_rate());
  }
  REQUIRE(single.work.drop_rate() > 0);
  // The transformer keeps the layers' MoE skeletons: what eval reports as the nominal active fraction.
  REQUIRE(model::active_ffn_fraction(ep.model().structure()) == model::active_ffn_fraction(w));
}

TEST_CASE("expert-parallel CMoE-converted stories260K gives the single-process logits bit for bit") {
  model::weights w = test::stories_weights();
  const auto calib = calib::calibration_windows(test::stories_text("tinystories_calib.txt"), 256, 512);
  convert::cmoe_options o;
  o.config = convert::parse_cmoe_config("S1A2E8");
  o.ka = 4;
  convert::cmoe_model(w, [&](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, calib); }, o);
  const auto text = test::stories_text("tinystories_calib.txt");
  const auto loads = distributed::expert_loads(model::transformer{w}, std::vector<std::int32_t>(text.begin(), text.begin() + 1024));
  const auto balanced = distributed::balanced_placement(w, loads, world_size());
  const auto tokens = test::stories_text("tinystories_eval.txt");
  const std::vector<std::int32_t> prompt(tokens.begin(), tokens.begin() + 200);
  const model::transformer single{model::weights(w)};
  distributed::expert_parallel ep{model::weights(w), balanced, MPI_COMM_WORLD};
  auto a = single.new_cache(), b = ep.model().new_cache();
  REQUIRE(same_bits(single.forward(prompt, a), ep.model().forward(prompt, b)));
  for (const std::int32_t next : {17, 300, 42}) REQUIRE(same_bits(single.forward({next}, a), ep.model().forward({next}, b)));
}

TEST_CASE("a placement survives a file round trip; a bad placement is refused by name") {
  std::mt19937 rng(14);
  const auto w = tiny_model(spec_layer(router_kind::softmax_topk, rng), rng);
  const auto p = scattered(w, 3);
  test::temp_dir dir;
  // Each rank its own file: ranks may share the temp directory.
  const std::string file = dir / ("placement-" + std::to_string(distributed::comm_rank(MPI_COMM_WORLD)) + ".json");
  distributed::save_placement(p, file);
  const auto back = distributed::load_placement(file);
  REQUIRE(back.ranks == p.ranks);
  REQUIRE(back.owner == p.owner);
  REQUIRE(distributed::fingerprint(w, back, dtype::f32) == distributed::fingerprint(w, p, dtype::f32));

  auto wrong = p;
  wrong.owner[1][2] = 3;
  REQUIRE_THROWS_WITH(distributed::validate(wrong, w), Catch::Contains("layer 1 expert 2 on rank 3, expected 0..2"));
  test::write_json(file, {{"format", "moeforge-placement"}, {"ranks", "two"}});
  REQUIRE_THROWS_WITH(distributed::load_placement(file), Catch::Contains(file) && Catch::Contains("not a valid placement file"));
}

TEST_CASE("balanced placement evens the ranks' calibration loads") {
  model::weights w;
  std::mt19937 rng(15);
  w = tiny_model(spec_layer(router_kind::softmax_topk, rng), rng);
  const std::vector<std::vector<double>> loads{{9, 1, 1, 1, 1, 4, 4}, {1, 1, 1, 1, 1, 1, 1}};
  const auto p = distributed::balanced_placement(w, loads, 2);
  // Heaviest first onto the lighter rank: 9 | 4, 4, 1 | then the ones alternate: 11 against 10.
  REQUIRE(p.owner[0] == std::vector<int>{0, 1, 0, 1, 0, 1, 1});
  REQUIRE(p.owner[1] == std::vector<int>{0, 1, 0, 1, 0, 1, 0});
}

TEST_CASE("a rank with a different model is refused at start-up with a clear message") {
  std::mt19937 rng(16);
  auto w = tiny_model(spec_layer(router_kind::softmax_topk, rng), rng);
  const auto p = distributed::contiguous_placement(w, world_size());
  const std::uint64_t fp = distributed::fingerprint(w, p, dtype::f32);
  if (distributed::comm_rank(MPI_COMM_WORLD) == world_size() - 1)
    std::get<moe_layer>(w.layers[1].ffn).router.weight(0, 0) += 1e-3f;
  if (world_size() == 1) {
    REQUIRE(distributed::fingerprint(w, p, dtype::f32) != fp);
    return;
  }
  REQUIRE_THROWS_WITH(distributed::expert_parallel(std::move(w), p, MPI_COMM_WORLD),
                      Catch::Contains(moeforge::detail::cat("rank ", world_size() - 1, "'s model or placement differs from rank 0's")));
}

// Run only by the ctest entry distributed_rank_failure (hidden from the others):
// rank MOEFORGE_TEST_FAIL_RANK fails while loading, the others wait in the
// start-up check; the job must end with that rank's reason, not hang.
TEST_CASE("a rank that throws ends the whole job with its reason", "[.fault]") {
  const char* fail = std::getenv("MOEFORGE_TEST_FAIL_RANK");
  REQUIRE(fail);
  std::mt19937 rng(17);
  auto w = tiny_model(spec_layer(router_kind::softmax_topk, rng), rng);
  const auto p = distributed::contiguous_placement(w, world_size());
  distributed::run_or_abort(MPI_COMM_WORLD, [&] {
    if (distributed::comm_rank(MPI_COMM_WORLD) == std::atoi(fail)) throw io_error("injected failure: cannot read the model's shard");
    distributed::expert_parallel ep(std::move(w), p, MPI_COMM_WORLD);
    return 0;
  });
  FAIL("the job should have been aborted");
}

int main(int argc, char** argv) {
  distributed::mpi_session mpi(&argc, &argv);
  return Catch::Session().run(argc, argv);
}
