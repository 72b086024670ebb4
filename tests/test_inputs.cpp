// Checkpoint forms the format tests did not reach, each run end to end on
// stories260K: a Hugging Face checkpoint sharded over several files, F16 and
// BF16 checkpoints (all through io::load_model), a NaN weight, and a NaN
// value at one position of the attention.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/io/hf.hpp"
#include "moeforge/io/llama2c.hpp"
#include "moeforge/io/load.hpp"
#include "support/safetensors_writer.hpp"
#include "support/stories.hpp"
#include "support/temp_dir.hpp"
#include "support/util.hpp"

using namespace moeforge;
using namespace moeforge::test;

namespace {

std::vector<raw_tensor> read_tensors(const std::string& file) {
  const io::safetensors_file f(file);
  std::vector<raw_tensor> out;
  for (const auto& t : f.tensors()) out.push_back({t.name, t.shape, f.read(t.name)});
  return out;
}

/// stories260K in Hugging Face's layout: config.json and its tensors.
struct exported_stories {
  temp_dir tmp;
  std::string dir = tmp / "hf";
  std::vector<raw_tensor> tensors;
  exported_stories() {
    io::save_hf(stories_weights(), dir);
    tensors = read_tensors(dir + "/model.safetensors");
  }
  /// A copy of the model directory with only config.json in it, for other tensor files.
  std::string empty_copy(const std::string& name) const {
    const std::string out = tmp / name;
    std::filesystem::create_directories(out);
    std::filesystem::copy_file(dir + "/config.json", out + "/config.json");
    return out;
  }
};

std::vector<std::int32_t> sample_tokens() {
  std::vector<std::int32_t> tokens{1};
  for (int i = 0; i < 40; ++i) tokens.push_back(std::int32_t(3 + (i * 37) % 500));
  return tokens;
}

/// Layer 0's FFN inputs for `tokens`, fed in one forward pass after `prompt`
/// (another pass, skipped when empty).
matrix layer0_ffn_inputs(const model::weights& w, const std::vector<std::int32_t>& prompt, const std::vector<std::int32_t>& tokens) {
  const model::transformer tr(w);
  auto cache = tr.new_cache();
  if (!prompt.empty()) tr.forward(prompt, cache);
  matrix x;
  model::forward_options o;
  o.stop_after_layer = 0;
  o.on_ffn_input = [&](index_t, const_matrix_ref in) { x = in; };
  tr.forward(tokens, cache, o);
  return x;
}

/// stories260K with an Inf in token `id`'s embedding, which makes its RMSNorm
/// output, so its query, key and value, NaN in every layer. Untied, so the
/// classifier keeps finite logits for the other tokens.
model::weights inf_embedding(std::int32_t id) {
  model::weights w = stories_weights();
  w.lm_head = w.tok_emb;
  w.config.tied_embeddings = false;
  w.tok_emb(id, 0) = std::numeric_limits<float>::infinity();
  return w;
}

}  // namespace

TEST_CASE("a checkpoint sharded over three files loads like the single file, from its directory or its index") {
  const exported_stories hf;
  const std::string dir = hf.empty_copy("sharded");
  nlohmann::json index{{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  for (int shard = 0; shard < 3; ++shard) {
    const std::string name = "model-0000" + std::to_string(shard + 1) + "-of-00003.safetensors";
    std::vector<raw_tensor> part;
    for (std::size_t i = std::size_t(shard); i < hf.tensors.size(); i += 3) {
      part.push_back(hf.tensors[i]);
      index["weight_map"][hf.tensors[i].name] = name;
    }
    write_tensors(dir + "/" + name, part, dtype::f32);
  }
  write_json(dir + "/model.safetensors.index.json", index);
  REQUIRE(index["weight_map"].size() == hf.tensors.size());

  const matrix want = logits(io::load_model(hf.dir), sample_tokens());
  CHECK(logits(io::load_model(dir), sample_tokens()) == want);
  CHECK(logits(io::load_model(dir + "/model.safetensors.index.json"), sample_tokens()) == want);

  // A tensor the index names in a shard that lacks it is an error naming the tensor.
  index["weight_map"][hf.tensors[0].name] = "model-00002-of-00003.safetensors";
  write_json(dir + "/model.safetensors.index.json", index);
  CHECK_THROWS_WITH(io::load_model(dir), Catch::Contains(hf.tensors[0].name));
}

TEST_CASE("F16 and BF16 checkpoints run exactly as F32 checkpoints of the same rounded values") {
  const exported_stories hf;
  for (dtype type : {dtype::f16, dtype::bf16}) {
    INFO(dtype_name(type));
    auto rounded = hf.tensors;
    for (auto& t : rounded)
      for (float& v : t.values) v = stored_value(type, v);
    const std::string half = hf.empty_copy("half-" + std::string(dtype_name(type)));
    const std::string full = hf.empty_copy("full-" + std::string(dtype_name(type)));
    write_tensors(half + "/model.safetensors", hf.tensors, type);
    write_tensors(full + "/model.safetensors", rounded, dtype::f32);
    const matrix got = logits(io::load_model(half), sample_tokens());
    CHECK(got == logits(io::load_model(full), sample_tokens()));
    // Rounding changed the model, and not by much: the dtype really was half precision.
    const matrix f32 = logits(io::load_model(hf.dir), sample_tokens());
    CHECK(got != f32);
    CHECK((got - f32).cwiseAbs().maxCoeff() < 0.5f);
  }
}

TEST_CASE("a NaN weight in a llama2.c checkpoint loads, and the forward pass stops with value_error at the next FFN") {
  auto bytes = moeforge::detail::read_whole_file(data_file("models/stories260K/stories260K.bin"), "test");
  const auto& c = stories_weights().config;
  // llama2.c's order: the 7-field header, token embeddings [V, D], the
  // attention norms [L, D], then wq [L, D, D]: this is layer 0's wq(0, 0).
  const std::size_t at = 28 + 4 * std::size_t(c.vocab_size * c.dim + c.n_layers * c.dim);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(bytes.data() + at, &nan, 4);
  const auto w = io::parse_llama2c(bytes.data(), bytes.size(), "nan.bin");
  REQUIRE(std::isnan(w.layers[0].wq(0, 0)));
  REQUIRE(std::isfinite(w.layers[0].wq(0, 1)));
  CHECK_THROWS_AS(logits(w, {1, 5, 7}), value_error);
}

TEST_CASE("a NaN in the classifier's row of a token never fed stops the forward pass with value_error naming the position") {
  model::weights w = stories_weights();
  REQUIRE(w.config.tied_embeddings);  // the classifier is the embedding: token 3's row is never looked up below
  w.tok_emb(3, 0) = std::numeric_limits<float>::quiet_NaN();
  const std::vector<std::int32_t> tokens{1, 5, 7};
  CHECK_THROWS_WITH(logits(w, tokens), Catch::Contains("logits at position 0 are not all finite"));
  const model::transformer owning{model::weights(w)};
  auto cache = owning.new_cache();
  CHECK_THROWS_AS(owning.forward(tokens, cache), value_error);
}

TEST_CASE("calibration inputs keep a failed forward pass's error type, naming what failed") {
  model::weights w = stories_weights();
  w.layers[0].wq(0, 0) = std::numeric_limits<float>::quiet_NaN();  // every token's layer-0 FFN input turns NaN
  const std::vector<std::vector<std::int32_t>> windows{{1, 5, 7}, {1, 9, 4}};
  CHECK_THROWS_AS(calib::ffn_inputs(w, 1, windows), value_error);
  CHECK_THROWS_WITH(calib::ffn_inputs(w, 1, windows), Catch::StartsWith("moeforge: calibration forward pass failed: ") && Catch::Contains("NaN"));
}

TEST_CASE("decoding a few tokens at once: a NaN value at a later row leaves the earlier rows bit for bit") {
  const model::weights w = inf_embedding(2);
  const auto finite = sample_tokens();
  REQUIRE(finite.size() > 13);
  REQUIRE(model::transformer::attention_rows_max >= 3);  // the chunk attends row by row
  const std::vector<std::int32_t> prompt(finite.begin(), finite.begin() + 10);
  const matrix want = layer0_ffn_inputs(w, prompt, {finite[10], finite[11], finite[12]});
  const matrix got = layer0_ffn_inputs(w, prompt, {finite[10], 2, finite[12]});
  CHECK(got.row(0) == want.row(0));
  CHECK_FALSE(got.row(1).allFinite());
  CHECK_FALSE(got.row(2).allFinite());
}

TEST_CASE("a NaN value at a later position leaves earlier positions bit for bit, and the error names that position") {
  // Token 2 goes at position 20, inside the first 32-query block of
  // attention, so earlier rows share its products.
  const model::weights w = inf_embedding(2);
  const auto finite = sample_tokens();
  auto poisoned = finite;
  poisoned[20] = 2;
  const matrix want = layer0_ffn_inputs(w, {}, finite), got = layer0_ffn_inputs(w, {}, poisoned);
  CHECK(got.topRows(20) == want.topRows(20));
  for (index_t t = 20; t < got.rows(); ++t) CHECK_FALSE(got.row(t).allFinite());
  CHECK_THROWS_WITH(logits(w, poisoned), Catch::Contains("input token 20 has a NaN or Inf value"));
}
