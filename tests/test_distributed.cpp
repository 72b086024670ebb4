// Expert parallelism over MPI: run by ctest under `mpirun -np 1/2/3`. Every
// rank runs every case and computes the single-process reference itself, so
// all ranks reach the same assertions with the same values (an assertion that
// failed on one rank only would leave the others waiting in a collective).
#include <catch2/catch.hpp>

#include <cstdlib>
#include <limits>
#include <omp.h>
#include <random>

#include "moeforge/convert/cmoe.hpp"
#include "moeforge/distributed/expert_parallel.hpp"
#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/model/eval.hpp"
#include "moeforge/io/load.hpp"
#include "support/hf_checkpoint.hpp"
#include "support/hf_dir_builder.hpp"
#include "support/random.hpp"
#include "support/run_catch.hpp"
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
  const int ranks = world_size();
  auto once = scattered(w, ranks);
  once.shared_owner = {ranks - 1, 0};  // layer 0's on the last rank, layer 1's on rank 0
  auto replicated = once;
  replicated.shared_owner = {-1, -1};
  SECTION("shared experts computed once, by one rank") { require_identical(w, once); }
  SECTION("shared experts computed by every rank") { require_identical(w, replicated); }
  SECTION("only the chosen rank packs them") {
    const distributed::expert_parallel ep{model::weights(w), once, MPI_COMM_WORLD};
    const int rank = distributed::comm_rank(MPI_COMM_WORLD);
    REQUIRE(ep.computes_shared(0) == (rank == ranks - 1));
    REQUIRE(ep.computes_shared(1) == (rank == 0));
  }
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
  test::layer_spec s;
  s.hidden = 40;
  s.widths = {13, 20, 7, 31, 16, 9, 24};
  s.shared = 1;
  const auto w = tiny_model(test::random_layer(s, rng), rng);
  auto p = scattered(w, 3);
  p.shared_owner = {2, 0};
  test::temp_dir dir;
  // Each rank its own file: ranks may share the temp directory.
  const std::string file = dir / ("placement-" + std::to_string(distributed::comm_rank(MPI_COMM_WORLD)) + ".json");
  distributed::save_placement(p, file);
  const auto back = distributed::load_placement(file);
  REQUIRE(back.ranks == p.ranks);
  REQUIRE(back.owner == p.owner);
  REQUIRE(back.shared_owner == p.shared_owner);
  REQUIRE(distributed::fingerprint(w, back, dtype::f32) == distributed::fingerprint(w, p, dtype::f32));
  auto moved = p;
  moved.shared_owner[0] = -1;
  REQUIRE(distributed::fingerprint(w, moved, dtype::f32) != distributed::fingerprint(w, p, dtype::f32));
  // A file from before shared_owner existed replicates the shared experts.
  test::write_json(file, {{"format", "moeforge-placement"}, {"ranks", 3}, {"owner", p.owner}});
  REQUIRE(distributed::load_placement(file).shared_of(1) == -1);

  auto wrong = p;
  wrong.owner[1][2] = 3;
  REQUIRE_THROWS_WITH(distributed::validate(wrong, w), Catch::Contains("layer 1 expert 2 on rank 3, expected 0..2"));
  wrong = p;
  wrong.shared_owner[1] = 3;
  REQUIRE_THROWS_WITH(distributed::validate(wrong, w), Catch::Contains("layer 1 computes its shared experts on rank 3, expected -1 (every rank) or 0..2"));
  test::write_json(file, {{"format", "moeforge-placement"}, {"ranks", "two"}});
  REQUIRE_THROWS_WITH(distributed::load_placement(file), Catch::Contains(file) && Catch::Contains("ranks"));
  // Numbers that are not exactly ints were truncated or wrapped into other ranks.
  for (const nlohmann::json& bad : {nlohmann::json(2.9), nlohmann::json(std::int64_t(4294967298)), nlohmann::json(true)}) {
    INFO(bad.dump());
    test::write_json(file, {{"format", "moeforge-placement"}, {"ranks", bad}, {"owner", p.owner}});
    REQUIRE_THROWS_WITH(distributed::load_placement(file), Catch::Contains("ranks") && Catch::Contains("wrong type"));
    auto owners = nlohmann::json(p.owner);
    owners[0][1] = bad;
    test::write_json(file, {{"format", "moeforge-placement"}, {"ranks", 3}, {"owner", owners}});
    REQUIRE_THROWS_WITH(distributed::load_placement(file), Catch::Contains("owner") && Catch::Contains("wrong type"));
  }
  // A save that fails leaves no temporary file beside its target.
  const std::string blocked = dir / ("blocked-" + std::to_string(distributed::comm_rank(MPI_COMM_WORLD)));
  std::filesystem::create_directories(blocked + "/inside");
  REQUIRE_THROWS_AS(distributed::save_placement(p, blocked), io_error);
  for (const auto& entry : std::filesystem::directory_iterator(dir.path()))
    REQUIRE(entry.path().filename().string().find(".partial-") == std::string::npos);
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

namespace {

/// Prefill and a decode step of a model read per rank from `path` against
/// io::load_transformer's single-process run of the same file: the same bits.
void require_identical_from_file(const std::string& path, const distributed::placement_options& how = {}) {
  const auto tokens = some_tokens(40, 8);
  const model::transformer single = io::load_transformer(path);
  auto cache = single.new_cache();
  const matrix prefill = single.forward(tokens, cache);
  const matrix decode = single.forward({3}, cache);
  const distributed::expert_parallel ep(path, {}, how, MPI_COMM_WORLD);
  auto ep_cache = ep.model().new_cache();
  REQUIRE(same_bits(prefill, ep.model().forward(tokens, ep_cache)));
  REQUIRE(same_bits(decode, ep.model().forward({3}, ep_cache)));
}

/// Every MoE layer of `ep`: the rank holds the panels of exactly the routed
/// experts its placement gives it, and no routed expert's plain weights.
void require_only_own_experts(const distributed::expert_parallel& ep) {
  const auto& w = ep.model().structure();
  for (std::size_t li = 0; li < w.layers.size(); ++li) {
    const auto* m = std::get_if<moe_layer>(&w.layers[li].ffn);
    if (!m) continue;
    for (std::size_t e = 0; e < m->experts.size(); ++e) {
      INFO("layer " << li << " expert " << e);
      if (m->experts[e].is_novice()) continue;
      REQUIRE(m->experts[e].weights.released);
      REQUIRE(ep.holds_expert(index_t(li), index_t(e)) == (ep.layout().owner[li][e] == ep.rank()));
    }
  }
}

}  // namespace

TEST_CASE("a model read per rank gives the single-process bits, each rank holding only its experts") {
  test::temp_dir dir;
  SECTION("sharded Hugging Face checkpoint") {
    const std::string hf = test::sharded_hf(dir, "hf", dtype::bf16, 3, {}, true, 61);
    require_identical_from_file(hf);
    const distributed::expert_parallel ep(hf, {}, {}, MPI_COMM_WORLD);
    require_only_own_experts(ep);
  }
  SECTION("native directory with shared experts, novices and compensation") {
    std::mt19937 rng(21);
    test::layer_spec s;
    s.hidden = 40;
    s.widths = {13, 20, 7, 31, 16, 9};
    s.shared = 1;
    s.novices = {2};
    moe_layer m = test::random_layer(s, rng);
    m.router.top_k = 2;
    m.compensation.means = test::random_matrix(6, s.hidden, rng, 0.05f);
    m.compensation.bias = m.compensation.means.colwise().sum().transpose();
    const std::string native = dir / "native";
    io::save_native(tiny_model(m, rng), native);
    for (const auto shared : {distributed::shared_experts::once, distributed::shared_experts::replicated}) {
      distributed::placement_options how;
      how.shared = shared;
      require_identical_from_file(native, how);
    }
    const distributed::expert_parallel ep(native, {}, {}, MPI_COMM_WORLD);
    require_only_own_experts(ep);
    // The placement is the one contiguous_placement makes from the whole model.
    REQUIRE(ep.layout().owner == distributed::contiguous_placement(io::load_model(native), world_size()).owner);
    REQUIRE(ep.layout().shared_owner == distributed::contiguous_placement(io::load_model(native), world_size()).shared_owner);
  }
}

TEST_CASE("a layer read with an expert filter reads only the experts it keeps") {
  test::temp_dir dir;
  const std::string hf = test::sharded_hf(dir, "hf", dtype::f32, 2, {}, true, 61);
  const std::string native = dir / "native";
  io::save_native(io::load_model(hf), native);
  const auto keep = [](index_t e) { return e == 1 || e == 2; };
  const auto check = [&](const model::layer& all, const model::layer& some) {
    const auto& a = std::get<moe_layer>(all.ffn);
    const auto& b = std::get<moe_layer>(some.ffn);
    REQUIRE(same_bits(a.router.weight, b.router.weight));
    REQUIRE(same_bits(all.wq, some.wq));
    for (index_t e = 0; e < a.num_experts(); ++e) {
      INFO("expert " << e);
      const auto& f = b.experts[std::size_t(e)].weights;
      REQUIRE(bool(f.released) == !keep(e));
      REQUIRE(f.intermediate() == 24);
      REQUIRE(f.hidden() == 32);
      REQUIRE(f.gated());
      const auto& whole = a.experts[std::size_t(e)].weights;
      if (keep(e)) {
        REQUIRE(same_bits(f.gate, whole.gate));
        REQUIRE(same_bits(f.up, whole.up));
        REQUIRE(same_bits(f.down, whole.down));
      } else {
        REQUIRE(f.gate.size() + f.up.size() + f.down.size() == 0);
      }
    }
  };
  SECTION("hf, an expert's tensors each") {
    const io::hf_layers src(hf);
    check(src.layer(1), src.layer(1, keep));
  }
  SECTION("hf, every expert packed in gate_up_proj and down_proj") {
    test::hf_dir_builder b(io::safetensors_checkpoint{hf});
    test::pack_mixtral(b, 3, 4, 24, 32);
    const io::hf_layers src(b.write(dir / "packed", test::read_json(hf + "/config.json")));
    const io::hf_layers per_expert(hf);
    const model::layer all = src.layer(1);
    // The packed read is the per-expert one, so comparing with it checks the slicing too.
    const model::layer unpacked = per_expert.layer(1);
    for (std::size_t e = 0; e < 4; ++e)
      REQUIRE(same_bits(std::get<moe_layer>(all.ffn).experts[e].weights.up, std::get<moe_layer>(unpacked.ffn).experts[e].weights.up));
    check(all, src.layer(1, keep));
    // A NaN in an expert the filter refuses is never read; in one it keeps, it is named.
    auto gate_up = b.get("model.layers.1.mlp.experts.gate_up_proj");
    gate_up[3 * 48 * 32 + 5] = std::numeric_limits<float>::quiet_NaN();
    b.put("model.layers.1.mlp.experts.gate_up_proj", {4, 48, 32}, gate_up);
    const io::hf_layers poisoned(b.write(dir / "poisoned", test::read_json(hf + "/config.json")));
    REQUIRE_NOTHROW(poisoned.layer(1, keep));
    REQUIRE_THROWS_WITH(poisoned.layer(1), Catch::Contains("model.safetensors': tensor 'model.layers.1.mlp.experts.gate_up_proj' expert 3"));
  }
  SECTION("native") {
    const io::native_layers src(native);
    check(src.layer(1), src.layer(1, keep));
  }
}

TEST_CASE("balanced placement of a model read per rank is the whole model's, one layer of calibration at a time") {
  test::temp_dir dir;
  std::mt19937 rng(22);
  const std::string native = dir / "native";
  const auto w = tiny_model(spec_layer(router_kind::softmax_topk, rng), rng);
  io::save_native(w, native);
  const auto tokens = some_tokens(500, 10);  // two windows of the context of 320
  distributed::placement_options how;
  how.calibration = [&](const model::config&) { return tokens; };
  const distributed::expert_parallel ep(native, {}, how, MPI_COMM_WORLD);
  const auto whole = distributed::balanced_placement(w, distributed::expert_loads(model::transformer{w}, tokens), world_size());
  REQUIRE(ep.layout().owner == whole.owner);
  REQUIRE(ep.layout().shared_owner == whole.shared_owner);
  require_only_own_experts(ep);
  require_identical_from_file(native, how);
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

TEST_CASE("the fingerprint covers every config field and the kernels' token rounding") {
  std::mt19937 rng(18);
  const auto w = tiny_model(spec_layer(router_kind::softmax_topk, rng), rng);
  const auto p = distributed::contiguous_placement(w, world_size());
  const std::uint64_t fp = distributed::fingerprint(w, p, dtype::f32);
  const auto differs = [&](auto&& change) {
    auto other = w;
    change(other.config);
    return distributed::fingerprint(other, p, dtype::f32) != fp;
  };
  CHECK(differs([](model::config& c) { c.rope = c.rope == model::rope_style::interleaved ? model::rope_style::half_split : model::rope_style::interleaved; }));
  CHECK(differs([](model::config& c) { c.bos_token += 1; }));
  CHECK(differs([](model::config& c) { c.eos_token += 1; }));
  CHECK(distributed::fingerprint(w, p, runtime::detail::weight_format(dtype::bf16, false)) !=
        distributed::fingerprint(w, p, runtime::detail::weight_format(dtype::bf16, true)));
}

TEST_CASE("ranks fed different tokens are refused on every rank with a typed error, not an MPI failure") {
  std::mt19937 rng(19);
  const auto w = tiny_model(spec_layer(router_kind::softmax_topk, rng), rng);
  distributed::expert_parallel ep{model::weights(w), distributed::contiguous_placement(w, world_size()), MPI_COMM_WORLD};
  auto cache = ep.model().new_cache();
  // The last rank reads another text (or the same text from another path).
  const auto tokens = some_tokens(40, world_size() > 1 && distributed::comm_rank(MPI_COMM_WORLD) == world_size() - 1 ? 8 : 7);
  if (world_size() == 1) {
    CHECK_NOTHROW(ep.model().forward(tokens, cache));
    return;
  }
  REQUIRE_THROWS_WITH(ep.model().forward(tokens, cache), Catch::Contains("the ranks routed different tokens"));
}

TEST_CASE("the fingerprint covers each routed expert's activation, not its weights (which a rank may not hold)") {
  std::mt19937 rng(17);
  auto w = tiny_model(spec_layer(router_kind::softmax_topk, rng), rng);
  const auto p = distributed::contiguous_placement(w, world_size());
  const std::uint64_t fp = distributed::fingerprint(w, p, dtype::f32);
  auto& expert = std::get<moe_layer>(w.layers[1].ffn).experts[0].weights;
  expert.up(0, 0) += 1.0f;
  REQUIRE(distributed::fingerprint(w, p, dtype::f32) == fp);
  expert.act = expert.act == activation::silu ? activation::gelu : activation::silu;
  REQUIRE(distributed::fingerprint(w, p, dtype::f32) != fp);
}

TEST_CASE("a load that fails on one rank throws on every rank, naming that rank, without hanging") {
  test::temp_dir dir;
  std::mt19937 rng(23);
  const std::string native = dir / "native";
  io::save_native(tiny_model(spec_layer(router_kind::softmax_topk, rng), rng), native);
  const int last = world_size() - 1;
  const bool fails = distributed::comm_rank(MPI_COMM_WORLD) == last;
  const std::string path = fails ? dir / "missing" : native;
  const auto message = fails ? std::string("missing") : moeforge::detail::cat("rank ", last, " of ", world_size(), " failed to load the model");
  REQUIRE_THROWS_WITH(distributed::expert_parallel(path, {}, {}, MPI_COMM_WORLD), Catch::Contains(message));
}

TEST_CASE("an expert this rank computes that arrives released is refused, naming layer and expert") {
  test::temp_dir dir;
  std::mt19937 rng(24);
  const std::string native = dir / "native";
  io::save_native(tiny_model(spec_layer(router_kind::softmax_topk, rng), rng), native);
  io::load_options opt;
  opt.on_layer = [](index_t, model::layer& l) {
    for (auto& x : std::get<moe_layer>(l.ffn).experts) release(x.weights);
  };
  // Each rank owns an expert of layer 0 (7 experts, at most 3 ranks), so each fails on its own.
  REQUIRE_THROWS_WITH(distributed::expert_parallel(native, opt, {}, MPI_COMM_WORLD),
                      Catch::Contains("expert parallel: layer 0 expert") && Catch::Contains("weights were released"));
}

TEST_CASE("placement options that would be ignored and out-of-range expert queries are refused") {
  std::mt19937 rng(25);
  const auto w = tiny_model(spec_layer(router_kind::softmax_topk, rng), rng);
  test::temp_dir dir;
  const std::string native = dir / "native";
  io::save_native(w, native);
  distributed::placement_options how;
  how.given = distributed::contiguous_placement(w, world_size());
  how.shared = distributed::shared_experts::once;
  REQUIRE_THROWS_WITH(distributed::expert_parallel(native, {}, how, MPI_COMM_WORLD), Catch::Contains("both a given placement and calibration or shared"));
  how.shared = distributed::default_shared_experts;
  how.given = distributed::contiguous_placement(w, world_size() + 1);
  how.source = "placement.json";
  REQUIRE_THROWS_WITH(distributed::expert_parallel(native, {}, how, MPI_COMM_WORLD),
                      Catch::Contains(moeforge::detail::cat("placement 'placement.json' of model '", native, "': made for ", world_size() + 1, " ranks")));
  const distributed::expert_parallel ep(model::weights(w), distributed::contiguous_placement(w, world_size()), MPI_COMM_WORLD);
  REQUIRE_THROWS_WITH(ep.holds_expert(1, 7), Catch::Contains("holds_expert(layer 1, expert 7)"));
  REQUIRE_THROWS_WITH(ep.holds_expert(2, 0), Catch::Contains("holds_expert(layer 2, expert 0)"));
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
  return moeforge::test::run_catch(argc, argv);
}
