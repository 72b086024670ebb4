// Streaming conversion (convert/stream.hpp): a sharded checkpoint converted
// one layer at a time gives exactly the in-memory conversion, survives a stop
// and a resume, never shows a half-written output, and refuses damaged input
// before writing anything.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "../benchmarks/synthetic.hpp"
#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/convert/stream.hpp"
#include "moeforge/io/load.hpp"
#include "support/random.hpp"
#include "support/temp_dir.hpp"
#include "support/util.hpp"

using namespace moeforge;
using namespace moeforge::test;
namespace fs = std::filesystem;

namespace {

// The same check as test_safetensors.cpp's (the unity build may see either first).
#ifndef CHECK_REJECTS
#define CHECK_REJECTS(expr, type, matcher) \
  do {                                     \
    CHECK_THROWS_AS(expr, type);           \
    CHECK_THROWS_WITH(expr, matcher);      \
  } while (0)
#endif

/// What to break in a checkpoint.
struct stream_damage {
  std::string drop;       ///< a tensor left out
  std::string misshape;   ///< a tensor written with its dimensions swapped
};

/// A small random LLaMA model written as a Hugging Face directory of `shards`
/// shards, tensors dealt round-robin so every layer is spread over all of them.
std::string stream_source(const temp_dir& dir, const std::string& name, dtype stored, int shards, const stream_damage& d = {}) {
  std::mt19937 rng(11);
  model::weights w;
  auto& c = w.config;
  c.arch = "llama";
  c.dim = 32;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.vocab_size = 64;
  c.seq_len = 64;
  c.rope = model::rope_style::half_split;
  c.tied_embeddings = false;
  w.tok_emb = random_matrix(c.vocab_size, c.dim, rng, 1.0f);
  w.lm_head = random_matrix(c.vocab_size, c.dim, rng);
  w.final_norm = vector::Ones(c.dim);
  for (index_t l = 0; l < c.n_layers; ++l) {
    model::layer x;
    x.attn_norm = vector::Ones(c.dim) + random_matrix(c.dim, 1, rng, 0.1f);
    x.ffn_norm = vector::Ones(c.dim) + random_matrix(c.dim, 1, rng, 0.1f);
    x.wq = random_matrix(c.n_heads * c.head_dim, c.dim, rng);
    x.wk = random_matrix(c.n_kv_heads * c.head_dim, c.dim, rng);
    x.wv = random_matrix(c.n_kv_heads * c.head_dim, c.dim, rng);
    x.wo = random_matrix(c.dim, c.n_heads * c.head_dim, rng);
    x.ffn = random_ffn(c.dim, 48, rng);
    w.layers.push_back(std::move(x));
  }
  const std::string single = dir / (name + ".single");
  io::save_hf(w, single);
  const io::safetensors_file src(single + "/model.safetensors");
  const std::string out = dir / name;
  fs::create_directories(out);
  fs::copy_file(single + "/config.json", out + "/config.json");
  std::vector<std::optional<io::safetensors_writer>> files(static_cast<std::size_t>(shards));
  nlohmann::json map = nlohmann::json::object();
  std::size_t i = 0;
  for (const auto& t : src.tensors()) {
    if (t.name == d.drop) continue;
    const std::size_t k = i++ % std::size_t(shards);
    const std::string file = "model-0000" + std::to_string(k + 1) + "-of-0000" + std::to_string(shards) + ".safetensors";
    if (!files[k]) files[k].emplace(out + "/" + file, 1 << 16);
    auto shape = t.shape;
    if (t.name == d.misshape) std::swap(shape.front(), shape.back());
    files[k]->add(t.name, shape, src.read(t.name).data(), stored);
    map[t.name] = file;
  }
  for (auto& f : files) f->finish();
  write_json(out + "/model.safetensors.index.json", {{"weight_map", map}});
  return out;
}

std::vector<std::vector<std::int32_t>> stream_windows() {
  std::mt19937 rng(3);
  std::uniform_int_distribution<std::int32_t> id(0, 63);
  std::vector<std::vector<std::int32_t>> out(3);
  for (std::size_t w = 0; w < out.size(); ++w) out[w].resize(w == 2 ? 17 : 40);
  for (auto& w : out)
    for (auto& t : w) t = id(rng);
  return out;
}

convert::cmoe_options stream_cmoe() {
  convert::cmoe_options o;
  o.config = convert::parse_cmoe_config("S1A2E4");
  o.ka = 4;
  return o;
}

/// Every tensor of a model, by native name, in the walk's order.
std::vector<std::pair<std::string, matrix>> stream_tensors(const model::weights& w) {
  std::vector<std::pair<std::string, matrix>> out;
  io::detail::for_each_tensor(
      w, [&](const std::string& n, const matrix& m) { out.emplace_back(n, m); }, [&](const std::string& n, const vector& v) { out.emplace_back(n, matrix(v)); });
  return out;
}

std::vector<std::string> stream_listing(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

TEST_CASE("a streamed conversion of a sharded checkpoint is bit-identical to the in-memory conversion", "[stream]") {
  temp_dir dir;
  const auto stored = GENERATE(dtype::f32, dtype::bf16);
  CAPTURE(dtype_name(stored));
  const std::string src = stream_source(dir, "src", stored, 3);
  const auto win = stream_windows();

  model::weights want = io::load_model(src);
  CHECK(want.weight_dtype == stored);
  convert::cmoe_model(want, [&](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, win); }, stream_cmoe());
  CHECK(want.weight_dtype == dtype::f32);  // the converted layers are F32 values, whatever the source stored

  convert::stream_options so;
  so.shard_bytes = 20'000;  // several output shards
  const auto rep = convert::cmoe_stream(src, win, dir / "out", stream_cmoe(), so);
  CHECK(rep.complete);
  REQUIRE(rep.layers.size() == 3);
  for (const auto& r : rep.layers) CHECK(r.at("config") == "S1A2E4");
  CHECK(fs::exists(dir / "out/model.safetensors.index.json"));
  const io::safetensors_checkpoint ck(dir / "out");
  CHECK(ck.shards().size() > 2);
  for (const auto& name : ck.names()) CHECK(ck.info(name).dtype == stored);

  const model::weights got = io::load_model(dir / "out");
  const auto a = stream_tensors(got), b = stream_tensors(want);
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    CAPTURE(a[i].first);
    REQUIRE(a[i].first == b[i].first);
    // BF16 out: the in-memory FP32 result rounded to nearest even.
    CHECK(a[i].second == (stored == dtype::bf16 ? rounded_to_bf16(b[i].second) : b[i].second));
  }
  CHECK(stream_listing(dir.path()) == std::vector<std::string>{"out", "src", "src.single"});
}

TEST_CASE("a conversion stopped after a layer and resumed writes the identical model; other options or tokens are refused", "[stream]") {
  temp_dir dir;
  const std::string src = stream_source(dir, "src", dtype::bf16, 2);
  const auto win = stream_windows();
  convert::stream_options so;
  so.shard_bytes = 30'000;
  convert::cmoe_stream(src, win, dir / "whole", stream_cmoe(), so);

  convert::stream_options stop = so;
  stop.stop_after_layers = 2;
  const auto first = convert::cmoe_stream(src, win, dir / "resumed", stream_cmoe(), stop);
  CHECK_FALSE(first.complete);
  // Only the hidden partial directory exists: never a half model at the output.
  CHECK_FALSE(fs::exists(dir / "resumed"));
  CHECK(fs::exists(dir / ".resumed.partial/progress.json"));

  CHECK_REJECTS(convert::cmoe_stream(src, win, dir / "resumed", stream_cmoe(), so), io_error,
                Catch::Contains("interrupted conversion") && Catch::Contains(".resumed.partial"));
  convert::stream_options resume = so;
  resume.resume = true;
  auto other = stream_cmoe();
  other.seed = 5;
  CHECK_REJECTS(convert::cmoe_stream(src, win, dir / "resumed", other, resume), config_error,
                Catch::Contains("cannot resume") && Catch::Contains("method differs") && Catch::Contains("\"seed\":5"));
  auto sized = stream_cmoe();
  sized.fit.size_rule = !sized.fit.size_rule;  // changes which fitting steps run on the later layers
  CHECK_REJECTS(convert::cmoe_stream(src, win, dir / "resumed", sized, resume), config_error, Catch::Contains("method differs"));
  auto fewer = win;
  fewer.pop_back();
  CHECK_REJECTS(convert::cmoe_stream(src, fewer, dir / "resumed", stream_cmoe(), resume), config_error, Catch::Contains("calibration differs"));

  const auto rest = convert::cmoe_stream(src, win, dir / "resumed", stream_cmoe(), resume);
  CHECK(rest.complete);
  CHECK(rest.resumed_at == 2);
  CHECK_FALSE(fs::exists(dir / ".resumed.partial"));
  REQUIRE(stream_listing(dir / "whole") == stream_listing(dir / "resumed"));
  for (const auto& f : stream_listing(dir / "whole")) {
    CAPTURE(f);
    if (f == "moeforge.json") continue;
    CHECK(file_bytes(dir / ("whole/" + f)) == file_bytes(dir / ("resumed/" + f)));
  }
  const auto ma = read_json(dir / "whole/moeforge.json"), mb = read_json(dir / "resumed/moeforge.json");
  CHECK(ma["config"] == mb["config"]);
  CHECK(ma["layers"] == mb["layers"]);
  CHECK(mb["provenance"]["layers"].size() == 3);
}

TEST_CASE("a streamed conversion never clobbers an existing output and replaces it only when asked, once complete", "[stream]") {
  temp_dir dir;
  const std::string src = stream_source(dir, "src", dtype::f32, 2);
  fs::create_directories(dir / "out");
  std::ofstream(dir / "out/keep") << "keep";
  CHECK_REJECTS(convert::cmoe_stream(src, stream_windows(), dir / "out", stream_cmoe(), {}), io_error, Catch::Contains("already exists"));
  CHECK(stream_listing(dir / "out") == std::vector<std::string>{"keep"});
  CHECK(stream_listing(dir.path()) == std::vector<std::string>{"out", "src", "src.single"});

  convert::stream_options replace;
  replace.overwrite = true;
  replace.stop_after_layers = 1;
  convert::cmoe_stream(src, stream_windows(), dir / "out", stream_cmoe(), replace);
  CHECK(stream_listing(dir / "out") == std::vector<std::string>{"keep"});  // a stopped run leaves the old output alone
  replace.stop_after_layers = -1;
  replace.resume = true;
  convert::cmoe_stream(src, stream_windows(), dir / "out", stream_cmoe(), replace);
  CHECK_FALSE(fs::exists(dir / "out/keep"));
  CHECK(io::is_native_dir(dir / "out"));
}

TEST_CASE("damaged input is refused with a typed error naming the file, and nothing is written", "[stream]") {
  temp_dir dir;
  const auto win = stream_windows();
  auto refuses = [&](const std::string& src, auto matcher, auto type_tag) {
    using type = decltype(type_tag);
    CHECK_REJECTS(convert::cmoe_stream(src, win, dir / "out", stream_cmoe(), {}), type, matcher);
    CHECK_FALSE(fs::exists(dir / "out"));
    CHECK_FALSE(fs::exists(dir / ".out.partial"));
  };

  SECTION("a shard missing from the index's directory") {
    const std::string src = stream_source(dir, "src", dtype::bf16, 3);
    fs::remove(src + "/model-00002-of-00003.safetensors");
    refuses(src, Catch::Contains("cannot open") && Catch::Contains(src + "/model-00002-of-00003.safetensors"), io_error(""));
  }
  SECTION("a tensor missing") {
    const std::string src = stream_source(dir, "src", dtype::f32, 3, {"model.layers.2.mlp.up_proj.weight", ""});
    refuses(src, Catch::Contains(src) && Catch::Contains("missing tensor 'model.layers.2.mlp.up_proj.weight'"), format_error(""));
  }
  SECTION("a tensor of the wrong shape") {
    const std::string src = stream_source(dir, "src", dtype::f32, 3, {"", "model.layers.1.mlp.down_proj.weight"});
    refuses(src, Catch::Contains("model-0000") && Catch::Contains("tensor 'model.layers.1.mlp.down_proj.weight' has shape [48, 32], expected [32, 48]"),
            shape_error(""));
  }
  SECTION("a truncated shard") {
    const std::string src = stream_source(dir, "src", dtype::bf16, 3);
    const std::string shard = src + "/model-00003-of-00003.safetensors";
    fs::resize_file(shard, fs::file_size(shard) - 100);
    refuses(src, Catch::Contains(shard) && Catch::Contains("exceed the data"), format_error(""));
  }
  SECTION("an unknown dtype") {
    const std::string src = stream_source(dir, "src", dtype::f32, 3);
    const std::string shard = src + "/model-00001-of-00003.safetensors";
    std::string bytes = file_bytes(shard);
    bytes.replace(bytes.find("\"F32\""), 5, "\"F99\"");
    std::ofstream(shard, std::ios::binary) << bytes;
    refuses(src, Catch::Contains(shard) && Catch::Contains("unknown dtype 'F99'"), format_error(""));
  }
}

TEST_CASE("make-model writes a sharded checkpoint that loads as the benchmark's in-memory synthetic model", "[stream]") {
  temp_dir dir;
  const auto& tiny = bench::find_shape("tiny");
  const auto stored = GENERATE(dtype::f32, dtype::bf16);
  CAPTURE(dtype_name(stored));
  bench::write_synthetic_hf(tiny, 2, stored, 3, 9, dir / "m");
  CHECK(io::safetensors_checkpoint(dir / "m").shards().size() == 3);
  const auto got = stream_tensors(io::load_model(dir / "m"));
  const auto want = stream_tensors(bench::synthetic_model(tiny, 2, "", 9));
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    CAPTURE(got[i].first);
    CHECK(got[i].second == (stored == dtype::bf16 ? rounded_to_bf16(want[i].second) : want[i].second));
  }
  CHECK_REJECTS(bench::write_synthetic_hf(tiny, 2, stored, 3, 9, dir / "m"), io_error, Catch::Contains("already exists"));
}
