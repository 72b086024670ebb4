// The transformer on the real stories260K model: golden greedy output and
// logits, prefill/decode agreement, the reference perplexity, MoE equivalence.
#include <catch2/catch.hpp>

#include <omp.h>

#include <limits>

#include "moeforge/model/eval.hpp"
#include "moeforge/model/sampling.hpp"
#include "support/random.hpp"
#include "support/stories.hpp"

using namespace moeforge;
using namespace moeforge::test;

namespace {

nlohmann::json golden() { return read_json(data_file("models/stories260K/greedy_golden.json")); }

std::vector<std::int32_t> eval_stream() { return stories_text("tinystories_eval.txt"); }

}  // namespace

TEST_CASE("greedy decoding of stories260K reproduces the independent golden tokens and text") {
  const auto g = golden();
  const auto want = g["tokens"].get<std::vector<std::int32_t>>();
  model::transformer tr(stories_weights());
  const auto got = model::generate(tr, {}, 256, {});
  REQUIRE(got.size() == want.size());
  CHECK(got == want);
  CHECK(stories_tokenizer().decode(got) == g["text"].get<std::string>());
}

TEST_CASE("stories260K logits at positions 0-3 match the golden logits within 1e-4") {
  const auto g = golden();
  const auto tokens = g["tokens"].get<std::vector<std::int32_t>>();
  model::transformer tr(stories_weights());
  auto cache = tr.new_cache();
  const matrix logits = tr.forward({tokens.begin(), tokens.begin() + 4}, cache);
  for (int pos = 0; pos < 4; ++pos) {
    const auto want = g["logits_first4_positions"][std::size_t(pos)].get<std::vector<float>>();
    REQUIRE(want.size() == 512);
    float worst = 0.0f;
    for (std::size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::abs(logits(pos, index_t(i)) - want[i]));
    INFO("position " << pos);
    CHECK(worst < 1e-4f);
  }
}

TEST_CASE("a model's active FFN fraction by configuration is what routing counts when every expert is selected") {
  std::mt19937 rng(12);
  const index_t hidden = 16, tokens = 4;
  layer_spec s;
  s.hidden = hidden;
  s.widths = {5, 9, 7};
  s.shared = 1;
  s.novices = {1};
  for (const router_kind kind : {router_kind::softmax_topk, router_kind::linear_topk, router_kind::quadratic_topk, router_kind::oracle}) {
    INFO(router_kind_name(kind));
    moe_layer m = test::random_layer(s, rng);
    m.router.kind = kind;
    m.router.top_k = 3;  // every expert: the count no longer depends on which the router picks
    if (m.router.fitted()) m.router.bias = test::random_matrix(3, 1, rng);
    if (kind == router_kind::quadratic_topk) {
      m.router.projection = test::random_matrix(2, hidden, rng);
      m.router.projection_bias = test::random_matrix(2, 1, rng);
      m.router.weight_quad = test::random_matrix(3, 3, rng);
    }
    m.shared[0].weights = test::random_ffn(hidden, 6, rng, activation::gelu, false);  // ungated: its neurons cost 2, not 3
    const ffn dense = test::random_ffn(hidden, 10, rng);
    model::weights w;
    w.layers.resize(2);
    w.layers[0].ffn = dense;
    w.layers[1].ffn = m;
    const matrix x = test::random_matrix(tokens, hidden, rng);
    runtime::route_stats counted = runtime::dense_stats(dense, tokens);
    counted += runtime::count_work(m, runtime::select(m, x));
    CHECK(model::active_ffn_fraction(w) == Approx(counted.active_fraction()).epsilon(1e-12));
  }
}

TEST_CASE("prefill of a window and token-by-token decode give the same logits") {
  const auto stream = eval_stream();
  const std::vector<std::int32_t> window(stream.begin(), stream.begin() + 100);
  model::transformer tr(stories_weights());
  auto batch_cache = tr.new_cache();
  const matrix batch = tr.forward(window, batch_cache);
  auto step_cache = tr.new_cache();
  for (std::size_t t = 0; t < window.size(); ++t) {
    const matrix one = tr.forward({window[t]}, step_cache);
    REQUIRE((one.row(0) - batch.row(index_t(t))).cwiseAbs().maxCoeff() < 1e-4f);
  }
  // A second chunk continues from the cache exactly like the batch did.
  auto split_cache = tr.new_cache();
  tr.forward({window.begin(), window.begin() + 37}, split_cache);
  const matrix rest = tr.forward({window.begin() + 37, window.end()}, split_cache);
  CHECK((rest - batch.bottomRows(63)).cwiseAbs().maxCoeff() < 1e-4f);
  // Chunks of up to transformer::attention_rows_max tokens attend row by row, several queries per head.
  auto chunk_cache = tr.new_cache();
  tr.forward({window.begin(), window.begin() + 37}, chunk_cache);
  for (index_t t = 37; t < index_t(window.size()); t += model::transformer::attention_rows_max) {
    const index_t n = std::min(model::transformer::attention_rows_max, index_t(window.size()) - t);
    const matrix part = tr.forward({window.begin() + t, window.begin() + t + n}, chunk_cache);
    REQUIRE((part - batch.middleRows(t, n)).cwiseAbs().maxCoeff() < 1e-4f);
  }
}

TEST_CASE("stories260K perplexity on the evaluation text matches the independent reference", "[slow]") {
  const auto& ref = stories_reference()["perplexity"];
  REQUIRE(ref["text"] == "data/tinystories_eval.txt");
  model::transformer tr(stories_weights());
  const auto r = model::perplexity(tr, eval_stream(), ref["ctx"].get<index_t>());
  CHECK(r.tokens == ref["tokens_with_bos"].get<index_t>());
  CHECK(r.windows == ref["windows"].get<index_t>());
  CHECK(r.predicted == ref["predicted"].get<index_t>());
  CHECK(r.ppl == Approx(ref["ppl"].get<double>()).epsilon(1e-5));  // the reference prints 7 digits
}

TEST_CASE("a dense model whose FFNs become an all-active MoE keeps its perplexity") {
  model::weights moe = stories_weights();
  std::mt19937 rng(7);
  for (auto& l : moe.layers) {
    const ffn dense = std::get<ffn>(l.ffn);
    moe_layer m;
    // An analytic router with every expert selected gives unit gates: the sum
    // of the experts is the dense FFN whatever the router weights are.
    m.router.kind = router_kind::cmoe_analytic;
    m.router.weight = matrix::Random(4, dense.hidden());
    m.router.weight_up = matrix::Random(4, dense.hidden());
    m.router.top_k = 4;
    std::vector<int> neurons(std::size_t(dense.intermediate()));
    std::iota(neurons.begin(), neurons.end(), 0);
    std::shuffle(neurons.begin(), neurons.end(), rng);
    const std::size_t widths[] = {50, 43, 43, 36};  // unequal on purpose
    std::size_t at = 0;
    for (std::size_t w : widths) {
      std::vector<int> part(neurons.begin() + std::ptrdiff_t(at), neurons.begin() + std::ptrdiff_t(at + w));
      m.experts.push_back({select_neurons(dense, part), {}, 0, {}});
      at += w;
    }
    REQUIRE(at == neurons.size());
    l.ffn = std::move(m);
  }
  const auto stream = eval_stream();
  const auto dense_ppl = model::perplexity(model::transformer(stories_weights()), stream, 512, 6);
  const auto moe_ppl = model::perplexity(model::transformer(moe), stream, 512, 6);
  CHECK(moe_ppl.predicted == dense_ppl.predicted);
  CHECK(moe_ppl.ppl == Approx(dense_ppl.ppl).epsilon(1e-5));
  // The layers ran as MoE with every routed expert selected: all stored work, none shared.
  CHECK(moe_ppl.work.shared == 0);
  CHECK(moe_ppl.work.selected > 0);
  CHECK(moe_ppl.work.selected == moe_ppl.work.stored);
}

TEST_CASE("temperature sampling is reproducible from its seed and differs across seeds") {
  model::transformer tr(stories_weights());
  model::sampling_options o;
  o.temperature = 1.0f;
  o.top_p = 0.9f;
  o.seed = 1;
  const auto a = model::generate(tr, {}, 60, o);
  const auto b = model::generate(tr, {}, 60, o);
  o.seed = 2;
  const auto c = model::generate(tr, {}, 60, o);
  CHECK(a == b);
  CHECK(a != c);
}

TEST_CASE("forward rejects tokens outside the vocabulary and positions past the context") {
  model::transformer tr(stories_weights());
  auto cache = tr.new_cache();
  CHECK_THROWS_AS(tr.forward({1, 600}, cache), config_error);
  std::vector<std::int32_t> too_long(513, 1);
  auto cache2 = tr.new_cache();
  CHECK_THROWS_WITH(tr.forward(too_long, cache2), Catch::Contains("positions 0..512 exceed the model's context of 512 (positions 0..511)"));
}

TEST_CASE("the one-layer steps refuse a layer that does not exist, hidden states of another width and positions past the context") {
  model::transformer tr(stories_weights());
  const auto& c = tr.config();
  const model::forward_options opt;
  matrix x = matrix::Zero(4, c.dim);
  CHECK_THROWS_WITH(tr.layer_step(c.n_layers, x, opt), Catch::Contains("layer 5 does not exist"));
  CHECK_THROWS_AS(tr.ffn_step(-1, x, opt), config_error);
  auto cache = tr.new_cache();
  CHECK_THROWS_AS(tr.attention_step(c.n_layers, x, cache, 0), config_error);
  matrix narrow = matrix::Zero(4, c.dim - 1);
  CHECK_THROWS_AS(tr.layer_step(0, narrow, opt), shape_error);
  CHECK_THROWS_AS(tr.ffn_step(0, narrow, opt), shape_error);
  matrix too_long = matrix::Zero(c.seq_len + 1, c.dim);
  CHECK_THROWS_WITH(tr.layer_step(0, too_long, opt), Catch::Contains("exceed the model's context"));
}

TEST_CASE("a forward pass stopped after a layer leaves the cache as it was, so the next pass computes what a fresh cache does") {
  model::transformer tr(stories_weights());
  const std::vector<std::int32_t> window{1, 403, 407, 261, 378};
  auto fresh = tr.new_cache();
  const matrix expected = tr.forward(window, fresh);
  auto cache = tr.new_cache();
  model::forward_options stop;
  stop.stop_after_layer = 1;
  CHECK(tr.forward(window, cache, stop).rows() == 0);
  CHECK(cache.length == 0);
  CHECK(tr.forward(window, cache) == expected);
}

TEST_CASE("a model config whose RoPE theta or norm epsilon computes nonsense is refused") {
  model::config c = stories_weights().config;
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (const float theta : {0.0f, -10000.0f, inf, nan}) {
    INFO(theta);
    model::config bad = c;
    bad.rope_theta = theta;
    CHECK_THROWS_WITH(model::validate(bad), Catch::Contains("rope_theta"));
  }
  for (const float eps : {-1e-5f, inf, nan}) {
    INFO(eps);
    model::config bad = c;
    bad.norm_eps = eps;
    CHECK_THROWS_WITH(model::validate(bad), Catch::Contains("norm_eps"));
  }
  c.norm_eps = 0;
  CHECK_NOTHROW(model::validate(c));
}

TEST_CASE("perplexity counts the stream's tokens whether or not a window limit was given, and the scored windows' when it cut") {
  model::transformer tr(stories_weights());
  const auto all = eval_stream();
  const std::vector<std::int32_t> stream(all.begin(), all.begin() + 201);  // windows of 100: 100, 100, and 1 token that predicts nothing
  const auto whole = model::perplexity(tr, stream, 100);
  CHECK(whole.windows == 2);
  CHECK(whole.tokens == 201);
  CHECK(model::perplexity(tr, stream, 100, 5).tokens == 201);
  const auto first = model::perplexity(tr, stream, 100, 1);
  CHECK(first.tokens == 100);
  CHECK(first.predicted == 99);
}

TEST_CASE("perplexity and the FFN work it reports are bit-identical for 1, 2, 3 and 4 threads") {
  // Several windows, so that with 2+ threads each window runs inside the
  // window-parallel loop, where a product whose blocking depends on the
  // OpenMP context would round differently than with 1 thread.
  const auto text = stories_text("tinystories_eval.txt");
  const model::transformer tr(stories_weights());
  const int before = omp_get_max_threads();
  std::vector<model::perplexity_result> r;
  for (int threads : {1, 2, 3, 4}) {
    omp_set_num_threads(threads);
    r.push_back(model::perplexity(tr, text, 256, 4));
  }
  omp_set_num_threads(before);
  for (std::size_t i = 1; i < r.size(); ++i) {
    CHECK(r[i].nll == r[0].nll);
    CHECK(r[i].work.shared == r[0].work.shared);
  }
}

TEST_CASE("greedy sampling takes the highest logit, ties going to the lower id") {
  model::sampler s(model::sampling_options{});
  Eigen::RowVectorXf logits(4);
  logits << 1.0f, 3.0f, 3.0f, 2.0f;
  CHECK(s.next(logits) == 1);
  logits << 5.0f, 5.0f, 5.0f, 5.0f;
  CHECK(s.next(logits) == 0);
}

TEST_CASE("sampling refuses an empty row, a NaN or +inf logit, and a row with every token masked") {
  const float inf = std::numeric_limits<float>::infinity();
  for (const float temperature : {0.0f, 1.0f}) {
    INFO("temperature " << temperature);
    model::sampling_options o;
    o.temperature = temperature;
    model::sampler s(o);
    CHECK_THROWS_AS(s.next(Eigen::RowVectorXf()), shape_error);
    Eigen::RowVectorXf logits(3);
    logits << 1.0f, std::numeric_limits<float>::quiet_NaN(), 2.0f;
    CHECK_THROWS_WITH(s.next(logits), Catch::Contains("logit 1"));
    logits << 1.0f, 2.0f, inf;
    CHECK_THROWS_WITH(s.next(logits), Catch::Contains("logit 2"));
    logits << -inf, -inf, -inf;
    CHECK_THROWS_AS(s.next(logits), value_error);
    logits << -inf, 0.5f, -inf;  // a masked token is never drawn
    for (int i = 0; i < 50; ++i) CHECK(s.next(logits) == 1);
  }
}

TEST_CASE("temperature divides the logits: two tokens with logits 0 and ln 3 are drawn 1:9 at T = 0.5 and 1:sqrt(3) at T = 2") {
  Eigen::RowVectorXf logits(2);
  logits << 0.0f, std::log(3.0f);
  const int draws = 20000;
  const std::pair<float, double> cases[] = {{0.5f, 1.0 / 10.0}, {2.0f, 1.0 / (1.0 + std::sqrt(3.0))}};
  for (const auto& [temperature, want] : cases) {
    model::sampling_options o;
    o.temperature = temperature;
    o.seed = 7;
    model::sampler s(o);
    int zeros = 0;
    for (int i = 0; i < draws; ++i) zeros += s.next(logits) == 0;
    INFO("T = " << temperature);
    CHECK(double(zeros) / draws == Approx(want).margin(0.015));
  }
}

TEST_CASE("top-p keeps the smallest set of tokens whose probability reaches p — 0.6 + 0.3 for p = 0.85, drawn 2:1") {
  Eigen::RowVectorXf logits(3);
  logits << std::log(6.0f), std::log(3.0f), 0.0f;  // probabilities 0.6, 0.3, 0.1
  model::sampling_options o;
  o.temperature = 1.0f;
  o.top_p = 0.85f;
  o.seed = 11;
  model::sampler s(o);
  const int draws = 20000;
  std::vector<int> count(3, 0);
  for (int i = 0; i < draws; ++i) ++count[std::size_t(s.next(logits))];
  CHECK(count[2] == 0);
  CHECK(double(count[1]) / draws == Approx(1.0 / 3.0).margin(0.015));
}

TEST_CASE("perplexity of a token outside the vocabulary: a config_error naming the window, not std::terminate") {
  // Each window runs inside an OpenMP parallel loop, and an exception that
  // leaves a parallel region terminates the process: a bad id in a text must
  // come back to the caller as the typed error forward() throws for it.
  model::transformer tr(stories_weights());
  const auto all = eval_stream();
  std::vector<std::int32_t> stream(all.begin(), all.begin() + 300);
  stream[250] = std::int32_t(tr.config().vocab_size);  // in the third window of 100
  CHECK_THROWS_AS(model::perplexity(tr, stream, 100), config_error);
  CHECK_THROWS_WITH(model::perplexity(tr, stream, 100), Catch::Contains("window 2") && Catch::Contains("outside the vocabulary"));
}

TEST_CASE("stopping after a layer the model lacks is refused: not a pass run to the end") {
  // calib::ffn_inputs asks for a layer this way: run to the end, the caller's
  // hook never sees that layer and its inputs stay uninitialised.
  model::transformer tr(stories_weights());
  const auto& c = tr.config();
  const std::vector<std::int32_t> window{1, 403, 407};
  for (const index_t bad : {c.n_layers, c.n_layers + 3, index_t(-2)}) {
    model::forward_options stop;
    stop.stop_after_layer = bad;
    auto cache = tr.new_cache();
    INFO("stop_after_layer " << bad);
    CHECK_THROWS_AS(tr.forward(window, cache, stop), config_error);
    CHECK(cache.length == 0);
    matrix x = matrix::Zero(2, c.dim);
    CHECK_THROWS_AS(tr.layer_step(0, x, stop), config_error);
    CHECK_THROWS_AS(tr.ffn_step(0, x, stop), config_error);
  }
}

TEST_CASE("kv cache positions never written are never attended: attention past the cache's length, or a length past its capacity, is refused") {
  model::transformer tr(stories_weights());
  const auto& c = tr.config();
  auto cache = tr.new_cache();
  tr.forward({1, 403, 407}, cache);
  matrix x = matrix::Ones(2, c.dim);
  // Positions 3..9 have no keys: attending to them reads the cache's uninitialised capacity.
  CHECK_THROWS_AS(tr.attention_step(0, x, cache, 10), config_error);
  CHECK(x == matrix::Ones(2, c.dim));
  // Writing again at or before the cache's length is how forward runs its layers.
  CHECK_NOTHROW(tr.attention_step(0, x, cache, 3));
  CHECK_NOTHROW(tr.attention_step(0, x, cache, 1));
  // A length past the capacity the cache holds (set by hand) is as impossible.
  auto fresh = tr.new_cache();
  fresh.length = 5;
  CHECK_THROWS_AS(tr.forward({1}, fresh), shape_error);
}

TEST_CASE("non-finite logits leave the cache's length: as every other refusal does") {
  // Like a NaN at an FFN's input, non-finite logits are an error: the caller
  // gets no logits, so the cache must not say the tokens were fed.
  model::weights w = stories_weights();
  REQUIRE(w.config.tied_embeddings);  // the classifier is the embedding: token 3's row is never looked up below
  w.tok_emb(3, 0) = std::numeric_limits<float>::quiet_NaN();
  const model::transformer tr(w);
  auto cache = tr.new_cache();
  CHECK_THROWS_AS(tr.forward({1, 5, 7}, cache), value_error);
  CHECK(cache.length == 0);
}
