// Bit-identity across 1, 2, 3 and 4 threads where the team really splits the
// work: the dense kernel on shapes past min_parallel_fma with several tasks in
// both phases, decoding (the weight-streaming path) on a model wide enough for
// one token to cross the threshold, and on stories260K generation,
// calib::ffn_inputs and a whole CMoE conversion. Each test states why its
// shapes split, and checks the threshold rather than assuming it.
#include <catch2/catch.hpp>

#include <cstring>

#include <random>

#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/convert/cmoe.hpp"
#include "moeforge/model/sampling.hpp"
#include "moeforge/runtime/dense_ffn.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/stories.hpp"
#include "support/threads.hpp"

using namespace moeforge;
using namespace moeforge::test;

namespace {

/// Every result equal to the first (the one-thread run), bit for bit.
template <class T>
void require_all_equal(const std::vector<T>& r) {
  for (std::size_t i = 1; i < r.size(); ++i) {
    INFO("threads " << i + 1 << " against 1");
    REQUIRE(r[i] == r[0]);
  }
}

/// One layer of a decoder wide enough that a single token's FFN crosses
/// min_parallel_fma: 512 features, a dense layer then an MoE layer; 8 query
/// heads over `kv_heads` kv heads.
model::weights wide_model(index_t context = 64, index_t kv_heads = 4) {
  std::mt19937 rng(31);
  model::weights w;
  auto& c = w.config;
  c.dim = 512;
  c.n_layers = 2;
  c.n_heads = 8;
  c.n_kv_heads = kv_heads;
  c.head_dim = 64;
  c.vocab_size = 96;
  c.seq_len = context;
  // Entries of 1/sqrt(fan-in): activations stay O(1) through both layers.
  const float in = 1.0f / std::sqrt(float(c.dim));
  w.tok_emb = random_matrix(c.vocab_size, c.dim, rng, 1.0f);
  w.final_norm = vector::Ones(c.dim);
  for (index_t l = 0; l < c.n_layers; ++l) {
    model::layer x;
    x.attn_norm = vector::Ones(c.dim);
    x.ffn_norm = vector::Ones(c.dim);
    x.wq = random_matrix(c.n_heads * c.head_dim, c.dim, rng, in);
    x.wk = random_matrix(c.n_kv_heads * c.head_dim, c.dim, rng, in);
    x.wv = random_matrix(c.n_kv_heads * c.head_dim, c.dim, rng, in);
    x.wo = random_matrix(c.dim, c.n_heads * c.head_dim, rng, in);
    w.layers.push_back(std::move(x));
  }
  ffn dense = random_ffn(c.dim, 1100, rng);
  dense.gate *= in / 0.3f;
  dense.up *= in / 0.3f;
  dense.down *= 1.0f / (0.3f * std::sqrt(1100.0f));
  w.layers[0].ffn = std::move(dense);
  layer_spec s;
  s.hidden = c.dim;
  s.widths = {700, 900, 650, 800};
  s.shared = 1;
  moe_layer m = random_layer(s, rng);
  m.router.top_k = 2;
  for (auto& ex : m.experts) ex.weights.down *= 0.1f;
  w.layers[1].ffn = std::move(m);
  return w;
}

/// The logits of every position, fed one token at a time as generation does.
matrix decode_logits(const model::transformer& tr, const std::vector<std::int32_t>& tokens) {
  auto cache = tr.new_cache();
  matrix out(index_t(tokens.size()), tr.config().vocab_size);
  for (std::size_t t = 0; t < tokens.size(); ++t) out.row(index_t(t)) = tr.forward({tokens[t]}, cache).row(0);
  return out;
}

void require_same_ffn(const ffn& a, const ffn& b) {
  REQUIRE(a.gate == b.gate);
  REQUIRE(a.up == b.up);
  REQUIRE(a.down == b.down);
}

/// Two conversions of one model are the same model, bit for bit.
void require_same_model(const model::weights& a, const model::weights& b) {
  REQUIRE(a.layers.size() == b.layers.size());
  for (std::size_t l = 0; l < a.layers.size(); ++l) {
    INFO("layer " << l);
    const auto& ma = std::get<moe_layer>(a.layers[l].ffn);
    const auto& mb = std::get<moe_layer>(b.layers[l].ffn);
    REQUIRE(ma.router.weight == mb.router.weight);
    REQUIRE(ma.router.weight_up == mb.router.weight_up);
    REQUIRE(ma.router.top_k == mb.router.top_k);
    REQUIRE(ma.experts.size() == mb.experts.size());
    for (std::size_t e = 0; e < ma.experts.size(); ++e) require_same_ffn(ma.experts[e].weights, mb.experts[e].weights);
    REQUIRE(ma.shared.size() == mb.shared.size());
    for (std::size_t s = 0; s < ma.shared.size(); ++s) require_same_ffn(ma.shared[s].weights, mb.shared[s].weights);
  }
}

}  // namespace

TEST_CASE("the dense kernel is bit-identical for 1-4 threads when both phases split") {
  // I = 1100 is several neuron chunks and H = 700 several output-row chunks
  // for every T, and every T crosses min_parallel_fma (checked): T <= 32 on
  // the weight-streaming path, the others on the packed GEMM.
  std::mt19937 rng(21);
  const index_t hidden = 700, inter = 1100;
  ffn f = random_ffn(hidden, inter, rng);
  f.down *= 0.1f;
  for (index_t t : {1, 3, 32, 97, 300}) {
    INFO("T " << t);
    REQUIRE(double(t) * double(inter) * double(hidden) * 3 >= runtime::detail::min_parallel_fma);
    REQUIRE(inter > runtime::detail::neuron_chunk(t));
    REQUIRE(hidden > runtime::detail::row_chunk(t));
    const matrix x = random_matrix(t, hidden, rng, 1.0f);
    const auto r = for_each_thread_count([&] { return runtime::dense_forward(f, x); });
    require_all_equal(r);
    if (t <= 3) {
      const matrix want = reference::dense(f, x);
      REQUIRE((r[0] - want).cwiseAbs().maxCoeff() <= 1e-5f * (1.0f + want.cwiseAbs().maxCoeff()));
    }
  }
}

TEST_CASE("decoding at a long context splits attention across the team — bit-identical for 1-4 threads, equal to the prefill within rounding") {
  // With 4 kv heads each task takes both query heads of its kv head; with
  // one, a task takes all 8 on one thread and fewer as the team grows
  // (transformer::heads_per_task: 8, 4, 2, 2 for 1-4 threads).
  const index_t kv_heads = GENERATE(4, 1);
  INFO("kv heads " << kv_heads);
  const model::weights w = wide_model(200, kv_heads);
  const auto& c = w.config;
  const index_t context = 150, steps = 10;
  REQUIRE(2.0 * double(c.n_heads) * double(context) * double(c.head_dim) >= model::transformer::attention_parallel_fma);
  std::vector<std::int32_t> tokens(std::size_t(context + steps));
  for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = std::int32_t((i * 37 + 5) % std::size_t(c.vocab_size));
  const model::transformer tr(w);
  const auto decoded = for_each_thread_count([&] {
    auto cache = tr.new_cache();
    tr.forward({tokens.begin(), tokens.begin() + context}, cache);
    matrix out(steps, c.vocab_size);
    for (index_t s = 0; s < steps; ++s) out.row(s) = tr.forward({tokens[std::size_t(context + s)]}, cache).row(0);
    return out;
  });
  require_all_equal(decoded);
  auto cache = tr.new_cache();
  const matrix prefill = tr.forward(tokens, cache).bottomRows(steps);
  REQUIRE((decoded[0] - prefill).cwiseAbs().maxCoeff() <= 1e-4f * (1.0f + prefill.cwiseAbs().maxCoeff()));
}

TEST_CASE("a kv cache of another model's layout, or positions past the context, are refused before anything is written") {
  const model::transformer tr(wide_model(40));
  const auto& c = tr.config();
  // As many layers, laid out position by position: [positions, kv heads·head_dim].
  auto other = tr.new_cache();
  for (auto* side : {&other.k, &other.v})
    for (auto& m : *side) m = matrix::Zero(3, c.n_kv_heads * c.head_dim);
  other.length = 3;
  REQUIRE_THROWS_AS(tr.forward({4}, other), shape_error);
  REQUIRE_THROWS_WITH(tr.forward({4}, other), Catch::Contains("kv cache was made for another model"));
  auto cache = tr.new_cache();
  tr.forward({1, 2, 3}, cache);
  const matrix before = cache.k[0];
  matrix x = matrix::Ones(2, c.dim);
  REQUIRE_THROWS_AS(tr.attention_step(0, x, cache, 39), config_error);  // positions 39 and 40 of 40
  REQUIRE_THROWS_AS(tr.attention_step(0, x, other, 3), shape_error);
  // Bit for bit, capacity past the stored positions included: that is never
  // initialised, and garbage that reads as NaN would fail a comparison of values.
  REQUIRE(cache.k[0].size() == before.size());
  REQUIRE(std::memcmp(cache.k[0].data(), before.data(), sizeof(float) * std::size_t(before.size())) == 0);
  REQUIRE(x == matrix::Ones(2, c.dim));
}

TEST_CASE("decoding and generation are bit-identical for 1-4 threads on a model whose every token splits") {
  // One token of either FFN crosses min_parallel_fma (checked), so every
  // decode step runs the streaming path on the whole team; the prompt's
  // prefill splits attention by head and the FFNs by task.
  const model::weights w = wide_model();
  const auto& dense = std::get<ffn>(w.layers[0].ffn);
  REQUIRE(double(dense.intermediate()) * double(w.config.dim) * 3 >= runtime::detail::min_parallel_fma);
  const auto& moe = std::get<moe_layer>(w.layers[1].ffn);
  REQUIRE(double(moe.shared[0].weights.intermediate() + 2 * 650) * double(w.config.dim) * 3 >= runtime::detail::min_parallel_fma);
  const model::transformer tr(w);
  const std::vector<std::int32_t> prompt{1, 17, 40, 3, 88, 52, 9, 61};
  model::sampling_options o;
  o.temperature = 1.0f;
  o.seed = 5;
  const auto tokens = for_each_thread_count([&] { return model::generate(tr, prompt, 24, o); });
  REQUIRE(tokens[0].size() > prompt.size() + 8);  // it generated something to compare
  require_all_equal(tokens);
  require_all_equal(for_each_thread_count([&] { return decode_logits(tr, tokens[0]); }));
  require_all_equal(for_each_thread_count([&] {
    auto cache = tr.new_cache();
    return matrix(tr.forward(tokens[0], cache));
  }));
}

TEST_CASE("stories260K: generation, calibration inputs and a CMoE conversion are bit-identical for 1-4 threads") {
  // stories260K decodes one token on the calling thread (its FFN is far below
  // min_parallel_fma), but the prompt's prefill splits attention across heads;
  // ffn_inputs and the conversion's calibration run their windows in parallel,
  // and the conversion's markers and assignment split across the team.
  const model::transformer tr(stories_weights());
  const auto calib = calib::calibration_windows(stories_text("tinystories_calib.txt"), 256, 2048);
  REQUIRE(calib.size() == 8);

  SECTION("generate") {
    const auto prompt = stories_tokenizer().encode("Once upon a time, there was a little dog named Max. He liked to");
    model::sampling_options o;
    o.temperature = 0.9f;
    o.top_p = 0.95f;
    o.seed = 3;
    const auto r = for_each_thread_count([&] { return model::generate(tr, prompt, 200, o); });
    REQUIRE(r[0].size() > prompt.size() + 20);
    require_all_equal(r);
  }
  SECTION("calib::ffn_inputs") {
    for (index_t layer : {0, 4}) {
      INFO("layer " << layer);
      require_all_equal(for_each_thread_count([&] { return calib::ffn_inputs(stories_weights(), layer, calib); }));
    }
  }
  SECTION("convert::cmoe_model") {
    convert::cmoe_options o;
    o.config = convert::parse_cmoe_config("S1A3E8");
    o.ka = 10;
    std::vector<model::weights> models;
    std::vector<nlohmann::json> reports;
    for (int threads : {1, 2, 3, 4}) {
      with_threads(threads, [&] {
        models.push_back(stories_weights());
        nlohmann::json j;
        for (const auto& r : convert::cmoe_model(models.back(), [&](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, calib); }, o)) {
          auto one = to_json(r);
          one.erase("stage_seconds");  // wall-clock times, the only field that may differ
          j.push_back(one);
        }
        reports.push_back(j);
        return 0;
      });
    }
    for (std::size_t i = 1; i < models.size(); ++i) {
      INFO("threads " << i + 1 << " against 1");
      REQUIRE(reports[i] == reports[0]);
      require_same_model(models[i], models[0]);
    }
  }
}
