// The native model format: every kind of layer round-trips to identical bytes
// and identical outputs, a converted real model reloads bit-identically, and
// damaged directories or unsafe outputs fail clearly without losing anything.
// Packed directories (native with kernel panels) run what their transformer
// ran, mapped in place, and read as plain weights everywhere else.
#include <catch2/catch.hpp>

#include <fstream>
#include <iterator>

#include <nlohmann/json.hpp>

#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/convert/cmoe.hpp"
#include "moeforge/io/load.hpp"
#include "moeforge/io/native.hpp"
#include "moeforge/io/packed.hpp"
#include "support/random.hpp"
#include "support/stories.hpp"
#include "support/temp_dir.hpp"
#include "support/util.hpp"

using namespace moeforge;
using namespace moeforge::test;

namespace {

/// A small model with one of everything the format must carry: a dense FFN, a
/// Mixtral-style MoE with a gated shared expert, a novice and a major width,
/// a CMoE analytic router with ungated gelu experts, attention biases and an
/// untied classifier.
model::weights everything_model() {
  std::mt19937 rng(7);
  model::weights w;
  auto& c = w.config;
  c.arch = "test";
  c.dim = 24;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 6;
  c.vocab_size = 40;
  c.seq_len = 32;
  c.rope = model::rope_style::half_split;
  c.tied_embeddings = false;
  w.tok_emb = random_matrix(c.vocab_size, c.dim, rng);
  w.lm_head = random_matrix(c.vocab_size, c.dim, rng);
  w.final_norm = random_matrix(c.dim, 1, rng);
  for (index_t l = 0; l < c.n_layers; ++l) {
    model::layer x;
    x.attn_norm = random_matrix(c.dim, 1, rng);
    x.ffn_norm = random_matrix(c.dim, 1, rng);
    x.wq = random_matrix(c.n_heads * c.head_dim, c.dim, rng);
    x.wk = random_matrix(c.n_kv_heads * c.head_dim, c.dim, rng);
    x.wv = random_matrix(c.n_kv_heads * c.head_dim, c.dim, rng);
    x.wo = random_matrix(c.dim, c.n_heads * c.head_dim, rng);
    w.layers.push_back(std::move(x));
  }
  w.layers[0].ffn = random_ffn(c.dim, 19, rng);

  layer_spec mixtral;
  mixtral.hidden = c.dim;
  mixtral.widths = {9, 14, 5, 11};
  mixtral.shared = 1;
  mixtral.shared_gate = true;
  mixtral.novices = {2};
  moe_layer m1 = random_layer(mixtral, rng);
  m1.router.top_k = 2;
  m1.router.renormalize = false;
  m1.router.scale = 1.5f;
  m1.experts[1].major = 4;
  w.layers[1].ffn = std::move(m1);
  w.layers[1].bq = random_matrix(c.n_heads * c.head_dim, 1, rng);
  w.layers[1].bk = random_matrix(c.n_kv_heads * c.head_dim, 1, rng);
  w.layers[1].bv = random_matrix(c.n_kv_heads * c.head_dim, 1, rng);

  layer_spec analytic;
  analytic.hidden = c.dim;
  analytic.widths = {8, 8, 8};
  analytic.kind = router_kind::cmoe_analytic;
  moe_layer m2 = random_layer(analytic, rng);
  for (auto& e : m2.experts) e.weights = random_ffn(c.dim, 8, rng, activation::gelu, false);
  m2.router.top_k = 1;
  w.layers[2].ffn = std::move(m2);
  model::validate(w);
  return w;
}

}  // namespace

TEST_CASE("native: every layer kind round-trips to the same bytes and the same logits") {
  const auto w = everything_model();
  temp_dir tmp;
  io::save_native(w, tmp / "a", {{"note", "round trip"}});
  const auto back = io::load_native(tmp / "a");
  CHECK(back.config.rope == model::rope_style::half_split);
  CHECK_FALSE(back.config.tied_embeddings);
  const auto& m1 = std::get<moe_layer>(back.layers[1].ffn);
  CHECK(m1.experts[2].is_novice());
  CHECK(m1.experts[1].major == 4);
  CHECK(m1.shared.at(0).gated());
  CHECK(m1.router.scale == 1.5f);
  CHECK_FALSE(m1.router.renormalize);
  const auto& m2 = std::get<moe_layer>(back.layers[2].ffn);
  CHECK(m2.router.kind == router_kind::cmoe_analytic);
  CHECK_FALSE(m2.experts[0].weights.gated());
  CHECK(m2.experts[0].weights.act == activation::gelu);

  const std::vector<std::int32_t> tokens{1, 5, 9, 33, 2, 17, 39, 0};
  const matrix a = logits(w, tokens), b = logits(back, tokens);
  CHECK(a.cwiseEqual(b).all());

  // Saving what was loaded gives the same bytes: nothing is lost or reordered.
  io::save_native(back, tmp / "b", {{"note", "round trip"}});
  CHECK(file_bytes(tmp / "a/model.safetensors") == file_bytes(tmp / "b/model.safetensors"));
  CHECK(file_bytes(tmp / "a/moeforge.json") == file_bytes(tmp / "b/moeforge.json"));
  CHECK(io::read_native_manifest(tmp / "a")["provenance"]["note"] == "round trip");

  // load_model recognises the directory.
  CHECK(logits(io::load_model(tmp / "a"), tokens).cwiseEqual(a).all());
}

TEST_CASE("native: a CMoE-converted stories260K reloads to bit-identical logits") {
  auto w = stories_weights();
  const auto& tok = stories_tokenizer();
  const auto windows = calib::calibration_windows(stories_text("tinystories_calib.txt"), 256, 512);
  convert::cmoe_options o;
  o.config = convert::parse_cmoe_config("S1A1E4");
  convert::cmoe_model(w, [&](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, windows); }, o);

  temp_dir tmp;
  io::save_native(w, tmp / "cmoe");
  const auto back = io::load_native(tmp / "cmoe");
  const auto tokens = tok.encode("Once upon a time, there was a little dog.");
  CHECK(logits(w, tokens).cwiseEqual(logits(back, tokens)).all());
}

TEST_CASE("native: an existing directory is never clobbered unless asked, and only by a complete model") {
  const auto w = everything_model();
  temp_dir tmp;
  const std::string out = tmp / "model";
  io::save_native(w, out, {{"version", "first"}});
  const std::string before = file_bytes(out + "/model.safetensors");

  CHECK_THROWS_AS(io::save_native(w, out), io_error);
  CHECK(file_bytes(out + "/model.safetensors") == before);

  // A model that fails validation halfway must not touch the old directory or leave staging behind.
  auto broken = w;
  broken.layers[2].wq.resize(3, 3);
  io::native_save_options overwrite;
  overwrite.overwrite = true;
  CHECK_THROWS_AS(io::save_native(broken, out, {}, overwrite), shape_error);
  CHECK(file_bytes(out + "/model.safetensors") == before);
  // An attachment that cannot be copied fails after staging began: still nothing changes.
  auto missing_attachment = overwrite;
  missing_attachment.attachments.push_back({tmp / "no-such-tokenizer.bin", "tokenizer.bin"});
  CHECK_THROWS_AS(io::save_native(w, out, {{"version", "second"}}, missing_attachment), io_error);
  CHECK(io::read_native_manifest(out)["provenance"]["version"] == "first");
  CHECK(std::distance(std::filesystem::directory_iterator(tmp.path()), {}) == 1);

  io::save_native(w, out, {{"version", "second"}}, overwrite);
  CHECK(io::read_native_manifest(out)["provenance"]["version"] == "second");
  CHECK(std::distance(std::filesystem::directory_iterator(tmp.path()), {}) == 1);

  // Missing parents are created; a path through a regular file is refused before any work.
  io::save_native(w, tmp / "new/parents/model");
  CHECK(io::read_native_manifest(tmp / "new/parents/model")["format"] == "moeforge");
  CHECK_THROWS_AS(io::check_output_dir(out + "/moeforge.json/model", false), io_error);
  CHECK_THROWS_AS(io::save_native(w, out + "/moeforge.json/model"), io_error);
  // A trailing separator names the same directory; an empty path and a dangling
  // link on the way are refused up front.
  io::save_native(w, tmp / "slash/model/");
  CHECK(io::read_native_manifest(tmp / "slash/model")["format"] == "moeforge");
  CHECK_THROWS_AS(io::check_output_dir(tmp / "slash/model/", false), io_error);
  CHECK_THROWS_AS(io::check_output_dir("", true), io_error);
  std::filesystem::create_symlink(tmp / "nowhere", tmp / "dangling");
  CHECK_THROWS_AS(io::check_output_dir(tmp / "dangling/model", false), io_error);
  CHECK_THROWS_AS(io::check_output_dir(tmp / "dangling", true), io_error);
}

TEST_CASE("native: damaged directories fail with a typed error naming what is wrong") {
  const auto w = everything_model();
  temp_dir tmp;
  const std::string good = tmp / "good";
  io::save_native(w, good);
  const std::string dir = tmp / "bad";
  auto restore = [&] {
    std::filesystem::remove_all(dir);
    std::filesystem::copy(good, dir);
  };
  auto edit_manifest = [&](auto&& change) {
    restore();
    auto j = read_json(dir + "/moeforge.json");
    change(j);
    write_json(dir + "/moeforge.json", j);
  };
  auto message = [&] {
    try {
      io::load_native(dir);
    } catch (const format_error& e) {
      return std::string(e.what());
    } catch (const error& e) {
      return "wrong error type: " + std::string(e.what());
    }
    return std::string("no error");
  };
  using Catch::Matchers::Contains;

  SECTION("missing config key") {
    edit_manifest([](auto& j) { j["config"].erase("dim"); });
    CHECK_THAT(message(), Contains("missing key 'dim'"));
  }
  SECTION("wrong version") {
    edit_manifest([](auto& j) { j["version"] = 99; });
    CHECK_THAT(message(), Contains("version 99"));
  }
  SECTION("unknown router kind") {
    edit_manifest([](auto& j) { j["layers"][1]["router"]["kind"] = "hash"; });
    CHECK_THAT(message(), Contains("'hash'"));
  }
  SECTION("layer count contradicts the config") {
    edit_manifest([](auto& j) { j["layers"].erase(2); });
    CHECK_THAT(message(), Contains("describes 2 layers"));
  }
  SECTION("a tensor the description needs is missing") {
    edit_manifest([](auto& j) { j["layers"][1]["experts"][2] = {{"novice", false}, {"major", 0}, {"act", "silu"}, {"gated", true}}; });
    CHECK_THAT(message(), Contains("layers.1.moe.experts.2.gate"));
  }
  SECTION("a tensor the description does not mention") {
    edit_manifest([](auto& j) { j["layers"][0]["gated"] = false; });
    CHECK_THAT(message(), Contains("unexpected tensor 'layers.0.ffn.gate'"));
  }
  SECTION("shapes that contradict the config") {
    edit_manifest([](auto& j) { j["config"]["dim"] = 25; });
    CHECK_THAT(message(), Contains("expected [40, 25]"));
  }
  SECTION("a corrupt tensor file") {
    restore();
    std::filesystem::resize_file(dir + "/model.safetensors", 100);
    CHECK_THAT(message(), Contains("model.safetensors"));
  }
  SECTION("not JSON") {
    restore();
    std::ofstream(dir + "/moeforge.json") << "{\"format\": ";
    CHECK_THAT(message(), Contains("not valid JSON"));
  }
}

namespace {

matrix run_tokens(const model::transformer& t, const std::vector<std::int32_t>& tokens) {
  auto cache = t.new_cache();
  matrix prefill = t.forward(tokens, cache);
  const matrix step = t.forward({3}, cache);  // and a decode step on the cache it filled
  prefill.conservativeResize(prefill.rows() + 1, Eigen::NoChange);
  prefill.bottomRows(1) = step;
  return prefill;
}

/// everything_model with DualSparse sub-experts, tied embeddings when asked.
model::weights packed_test_model(bool tied) {
  model::weights w = everything_model();
  std::get<moe_layer>(w.layers[1].ffn).experts[3].parts = {4, 7};
  if (tied) {
    w.config.tied_embeddings = true;
    w.lm_head = matrix();
  }
  return w;
}

}  // namespace

TEST_CASE("packed: a packed directory runs what its transformer ran, bit for bit, from panels mapped in place") {
  const std::vector<std::int32_t> tokens{1, 5, 9, 33, 2, 17, 39, 0, 12};
  for (const dtype type : {dtype::f32, dtype::bf16})
    for (const bool tied : {false, true}) {
      INFO(dtype_name(type) << (tied ? ", tied" : ", untied"));
      const model::weights w = packed_test_model(tied);
      const model::transformer t(model::weights(w), type);
      temp_dir tmp;
      io::save_packed(t, tmp / "p", {{"note", "packed"}});
      const matrix want = run_tokens(t, tokens);

      const io::native_layers src(tmp / "p");
      REQUIRE(io::maps_panels(src, std::nullopt));
      CHECK(src.skeleton().weight_dtype == type);
      const model::transformer back = io::load_packed(src);
      // In place: the classifier's panels are the file's bytes.
      CHECK(back.packed().classifier.storage() == src.tensors().stored_bytes(src.panels("lm_head") ? "lm_head" : "tok_emb"));
      CHECK(run_tokens(back, tokens).cwiseEqual(want).all());
      CHECK(run_tokens(io::load_transformer(tmp / "p"), tokens).cwiseEqual(want).all());

      // Saved again: the same bytes.
      io::save_packed(back, tmp / "q", {{"note", "packed"}});
      CHECK(file_bytes(tmp / "p/model.safetensors") == file_bytes(tmp / "q/model.safetensors"));
      CHECK(file_bytes(tmp / "p/moeforge.json") == file_bytes(tmp / "q/moeforge.json"));

      // Everything else reads it as plain weights: the values the panels hold.
      const model::weights plain = io::load_model(tmp / "p");
      CHECK(plain.weight_dtype == type);
      CHECK(plain.tok_emb.cwiseEqual(w.tok_emb).all());  // the embedding in the type the weights had (F32)
      if (type == dtype::f32) {
        CHECK(logits(plain, tokens).cwiseEqual(logits(w, tokens)).all());
        CHECK(run_tokens(model::transformer(model::weights(plain), type), tokens).cwiseEqual(want).all());
      } else {
        const auto rounded = [](const matrix& m) { return matrix(m.unaryExpr([](float v) { return bf16_to_f32(f32_to_bf16(v)); })); };
        CHECK(plain.layers[0].wq.cwiseEqual(rounded(w.layers[0].wq)).all());
        const auto& e = std::get<moe_layer>(plain.layers[1].ffn).experts[3].weights;
        CHECK(e.down.cwiseEqual(rounded(std::get<moe_layer>(w.layers[1].ffn).experts[3].weights.down)).all());
      }
      // Another weight type repacks them.
      const dtype other = type == dtype::f32 ? dtype::bf16 : dtype::f32;
      REQUIRE_FALSE(io::maps_panels(src, runtime::detail::weight_format(other)));
      CHECK(run_tokens(io::load_transformer(tmp / "p", {}, other), tokens)
                .cwiseEqual(run_tokens(model::transformer(model::weights(plain), other), tokens))
                .all());
    }
}

TEST_CASE("packed: panels of any width unpack to the rows they were packed from") {
  std::mt19937 rng(3);
  const matrix m = random_matrix(45, 7, rng);
  const io::panel_layout l{45, 7, {10, 27}};
  for (const dtype type : {dtype::f32, dtype::bf16}) {
    INFO(dtype_name(type));
    // This build's width, from the kernel's own packing.
    const runtime::detail::panel_matrix p(m.data(), m.cols(), m.rows(), m.cols(), l.cuts, type);
    REQUIRE(p.panels() == std::size_t(l.panels(runtime::detail::gemm_nr)));
    matrix out(m.rows(), m.cols());
    io::detail::unpack_panels(static_cast<const char*>(p.storage()), type, runtime::detail::gemm_nr, l, out.data());
    matrix want = m;
    if (type == dtype::bf16) want = want.unaryExpr([](float v) { return bf16_to_f32(f32_to_bf16(v)); });
    CHECK(out.cwiseEqual(want).all());
    // Another width (a build with other registers), laid out by hand as documented.
    const index_t nr = 8;
    std::vector<float> f32(std::size_t(l.panels(nr) * l.depth * nr), 0.0f);
    std::vector<std::uint16_t> b16(f32.size(), 0);
    index_t panel = 0, start = 0;
    for (index_t end : {index_t(10), index_t(27), index_t(45)}) {
      for (index_t r = start; r < end; ++r)
        for (index_t k = 0; k < l.depth; ++k) {
          const index_t p0 = panel + (r - start) / nr, q = (r - start) % nr;
          f32[std::size_t((p0 * l.depth + k) * nr + q)] = m(r, k);
          b16[std::size_t((p0 * l.depth + k) * nr + runtime::detail::bf16_slot(q, nr))] = f32_to_bf16(m(r, k));
        }
      panel += (end - start + nr - 1) / nr;
      start = end;
    }
    const char* bytes = type == dtype::f32 ? reinterpret_cast<const char*>(f32.data()) : reinterpret_cast<const char*>(b16.data());
    out.setZero();
    io::detail::unpack_panels(bytes, type, nr, l, out.data());
    CHECK(out.cwiseEqual(want).all());
  }
}

TEST_CASE("packed: damaged packed directories fail with a typed error naming the tensor") {
  const model::transformer t(packed_test_model(false), dtype::bf16);
  temp_dir tmp;
  const std::string good = tmp / "good", dir = tmp / "bad";
  io::save_packed(t, good);
  const auto restore = [&] {
    std::filesystem::remove_all(dir);
    std::filesystem::copy(good, dir);
  };
  const auto edit_manifest = [&](auto&& change) {
    restore();
    auto j = read_json(dir + "/moeforge.json");
    change(j);
    write_json(dir + "/moeforge.json", j);
  };
  const auto message = [&] {
    try {
      io::load_transformer(dir);
    } catch (const error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  using Catch::Matchers::Contains;
  SECTION("a NaN in a panel") {
    restore();
    const std::size_t begin = io::safetensors_file(dir + "/model.safetensors").at("layers.1.moe.experts.3.down").begin;
    std::fstream f(dir + "/model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    std::uint64_t header = 0;  // the data section follows the 8-byte header length and the header
    f.read(reinterpret_cast<char*>(&header), 8);
    f.seekp(std::streamoff(8 + header + begin + 2));
    const std::uint16_t nan = 0x7fc0;
    f.write(reinterpret_cast<const char*>(&nan), 2);
    f.close();
    CHECK_THAT(message(), Contains("layers.1.moe.experts.3.down") && Contains("NaN"));
  }
  SECTION("a layout that does not match the tensor") {
    edit_manifest([](auto& j) { j["panels"]["tensors"]["layers.0.wq"][0] = 100; });
    CHECK_THAT(message(), Contains("layers.0.wq"));
  }
  SECTION("panels of another width and a shape that contradicts it") {
    edit_manifest([](auto& j) { j["panels"]["nr"] = runtime::detail::gemm_nr / 2; });
    CHECK_THAT(message(), Contains("has shape"));
  }
  SECTION("cuts outside the rows") {
    edit_manifest([](auto& j) { j["panels"]["tensors"]["layers.0.wq"][2] = {0}; });
    CHECK_THAT(message(), Contains("cuts must rise strictly"));
  }
  SECTION("a missing field") {
    edit_manifest([](auto& j) { j["panels"].erase("weight_dtype"); });
    CHECK_THAT(message(), Contains("missing key 'weight_dtype'"));
  }
}

TEST_CASE("packed: a transformer without panels for every layer is refused and nothing is written") {
  model::weights w = packed_test_model(false);
  model::transformer::external_moe elsewhere{{false, true, false}, [](index_t, const moe_layer&, const runtime::selection&, const_matrix_ref, matrix_ref out) { out.setZero(); }, false};
  const model::transformer t(std::move(w), std::move(elsewhere));
  temp_dir tmp;
  CHECK_THROWS_AS(io::save_packed(t, tmp / "p"), shape_error);
  CHECK_FALSE(std::filesystem::exists(tmp / "p"));
  CHECK_THROWS_AS(io::save_packed(model::transformer(packed_test_model(false)), tmp.path().string()), io_error);  // exists, not --force
}
