// Packed model directories (native, weight matrices as kernel panels): they
// run what the transformer that wrote them ran, bit for bit, from panels
// mapped in place; every other reader sees the plain weights (panels of any
// width unpacked); damaged ones fail naming the tensor. Built for every
// instruction set (the panel width and alignment differ).
#include <catch2/catch.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "moeforge/io/load.hpp"
#include "moeforge/io/packed.hpp"
#include "support/everything_model.hpp"
#include "support/hf_checkpoint.hpp"
#include "support/random.hpp"
#include "support/temp_dir.hpp"
#include "support/util.hpp"

using namespace moeforge;
using namespace moeforge::test;

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
      CHECK(src.skeleton().run_dtype() == type);
      CHECK(src.skeleton().weight_dtype == dtype::f32);  // what the weights were stored in
      const model::transformer back = io::load_packed(src);
      // In place: the classifier's panels are the file's bytes.
      CHECK(back.packed().classifier.storage() == src.tensors().stored_bytes(src.panels("lm_head") ? "lm_head" : "tok_emb"));
      CHECK(run_tokens(back, tokens).cwiseEqual(want).all());
      // Its routers' panels are packed again from the structure (not stored): a
      // Mixtral-style router and a CMoE analytic one's two matrices.
      CHECK(back.packed().ffn[1].router.weight.rows() == 4);
      CHECK(back.packed().ffn[2].router.weight_up.rows() == 3);
      CHECK(run_tokens(io::load_transformer(tmp / "p"), tokens).cwiseEqual(want).all());

      // Saved again: the same bytes.
      io::save_packed(back, tmp / "q", {{"note", "packed"}});
      CHECK(file_bytes(tmp / "p/model.safetensors") == file_bytes(tmp / "q/model.safetensors"));
      CHECK(file_bytes(tmp / "p/moeforge.json") == file_bytes(tmp / "q/moeforge.json"));

      // Everything else reads it as plain weights: the values the panels
      // hold, run by default in the panels' type, as the mapped model.
      const model::weights plain = io::load_model(tmp / "p");
      CHECK(plain.weight_dtype == dtype::f32);
      CHECK(plain.run_dtype() == type);
      CHECK(plain.tok_emb.cwiseEqual(w.tok_emb).all());  // the embedding stays exact
      CHECK(run_tokens(model::transformer(model::weights(plain)), tokens).cwiseEqual(want).all());
      if (type == dtype::f32) CHECK(logits(plain, tokens).cwiseEqual(logits(w, tokens)).all());
      // So does loading layer by layer when a caller edits the layers (eval --policy).
      io::load_options edit;
      edit.on_layer = [](index_t, model::layer&) {};
      CHECK(run_tokens(io::load_transformer(tmp / "p", edit), tokens).cwiseEqual(want).all());
      // Another weight type repacks them.
      const dtype other = type == dtype::f32 ? dtype::bf16 : dtype::f32;
      REQUIRE_FALSE(io::maps_panels(src, runtime::detail::weight_format(other)));
      CHECK(run_tokens(io::load_transformer(tmp / "p", {}, other), tokens)
                .cwiseEqual(run_tokens(model::transformer(model::weights(plain), other), tokens))
                .all());
    }
}

TEST_CASE("packed: a BF16 model read from a packed directory is saved as its source in BF16, not in the directory's F32") {
  // A packed directory stores what is not panels in F32, whatever the model's type: that is not the source's type.
  model::weights w = packed_test_model(false);
  io::detail::for_each_tensor(
      w, [](const std::string&, matrix& m) { m = rounded_to_bf16(m); }, [](const std::string&, vector& v) { v = rounded_to_bf16(v); });
  w.weight_dtype = dtype::bf16;
  temp_dir tmp;
  io::save_packed(model::transformer(std::move(w), dtype::bf16), tmp / "p", {});
  const model::weights plain = io::load_model(tmp / "p");
  REQUIRE(plain.stored_dtype() == dtype::bf16);
  io::native_save_options as_source;
  as_source.stored = plain.stored_dtype();
  as_source.as_source = true;
  io::save_native(plain, tmp / "n", {}, as_source);
  check_stored_types(tmp / "n", dtype::bf16, [](const std::string&) { return false; });
}

TEST_CASE("packed: a packed directory remembers an F16 source, whose exports and conversions are F16") {
  model::weights w = packed_test_model(false);
  io::detail::for_each_tensor(
      w, [](const std::string&, matrix& m) { m = rounded_to(dtype::f16, m); }, [](const std::string&, vector& v) { v = rounded_to(dtype::f16, v); });
  w.file_dtype = dtype::f16;  // as the loaders set it for an F16 file; F16 runs as F32
  temp_dir tmp;
  io::save_packed(model::transformer(std::move(w), dtype::f32), tmp / "p", {});
  const model::weights plain = io::load_model(tmp / "p");
  CHECK(plain.file_dtype == dtype::f16);
  CHECK(plain.stored_dtype() == dtype::f16);
  io::save_native(plain, tmp / "n");
  CHECK(io::safetensors_checkpoint(tmp / "n").matrix_dtype() == dtype::f16);
  // A directory written before the source type was recorded reads as before: its own tensors' type.
  auto j = read_json(tmp / "p/moeforge.json");
  j["panels"].erase("file_dtype");
  write_json(tmp / "p/moeforge.json", j);
  CHECK(io::load_model(tmp / "p").file_dtype == dtype::f32);
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
  const dtype type = GENERATE(dtype::f32, dtype::bf16);
  INFO(dtype_name(type));
  const model::transformer t(packed_test_model(false), type);
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
    f.seekp(std::streamoff(8 + header + begin + 4));
    const std::uint16_t bf16_nan = 0x7fc0;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    if (type == dtype::bf16)
      f.write(reinterpret_cast<const char*>(&bf16_nan), 2);
    else
      f.write(reinterpret_cast<const char*>(&nan), 4);
    f.close();
    CHECK_THAT(message(), Contains("layers.1.moe.experts.3.down") && Contains("non-finite value nan"));
  }
  SECTION("cuts where the runtime expects none") {
    edit_manifest([](auto& j) { j["panels"]["tensors"]["tok_emb"][2] = {8}; });  // 40 rows: as many panels as without
    CHECK_THAT(message(), Contains("model.tok_emb: panels restart"));
  }
  SECTION("a tensor listed as panels that the kernels do not read") {
    edit_manifest([](auto& j) { j["panels"]["tensors"]["final_norm"] = {24, 1, nlohmann::json::array()}; });
    CHECK_THAT(message(), Contains("lists 'final_norm'"));
  }
  SECTION("a kernel matrix not stored as panels") {
    edit_manifest([](auto& j) { j["panels"]["tensors"].erase("lm_head"); });
    CHECK_THAT(message(), Contains("'lm_head' must be stored as panels"));
  }
  SECTION("panels of another type than the manifest says") {
    edit_manifest([type](auto& j) { j["panels"]["type"] = type == dtype::f32 ? "BF16" : "F32"; });
    CHECK_THAT(message(), Contains("panel tensor 'lm_head' is"));
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
  SECTION("a source type moeforge does not know") {
    edit_manifest([](auto& j) { j["panels"]["file_dtype"] = "F8_E4M3"; });
    CHECK_THAT(message(), Contains("moeforge.json: panels.file_dtype: unsupported dtype F8_E4M3"));
  }
}

TEST_CASE("packed: a transformer without panels for every layer is refused and nothing is written") {
  model::weights w = packed_test_model(false);
  model::transformer::external_moe elsewhere{{false, true, false}, [](index_t, const moe_layer&, const runtime::selection&, const_matrix_ref, matrix_ref out) { out.setZero(); }, false};
  const model::transformer t(std::move(w), std::move(elsewhere));
  temp_dir tmp;
  CHECK_THROWS_AS(io::save_packed(t, tmp / "p"), config_error);
  CHECK_FALSE(std::filesystem::exists(tmp / "p"));
  CHECK_THROWS_AS(io::save_packed(model::transformer(packed_test_model(false)), tmp.path().string()), io_error);  // exists, not --force
}

TEST_CASE("packed: a NaN anywhere in a big panel is found and placed, whichever thread's block holds it") {
  std::mt19937 rng(5);
  matrix m = random_matrix(1100, 1024, rng);  // over a million values: several blocks of the check
  m(1099, 5) = std::numeric_limits<float>::infinity();
  for (const dtype type : {dtype::f32, dtype::bf16}) {
    INFO(dtype_name(type));
    const runtime::detail::panel_matrix p(m.data(), m.cols(), m.rows(), m.cols(), {}, type);
    CHECK_THROWS_WITH(io::detail::require_finite_panels(p, "t"), Catch::Matchers::EndsWith("t: non-finite value inf at [1099, 5]"));
    matrix ok = m;
    ok(1099, 5) = 1.0f;
    CHECK_NOTHROW(io::detail::require_finite_panels(runtime::detail::panel_matrix(ok.data(), ok.cols(), ok.rows(), ok.cols(), {}, type), "t"));
  }
}

TEST_CASE("packed: a tied classifier kept apart must be the embedding rounded") {
  // Tied, F32 weights run as BF16: BF16 classifier panels beside F32 embedding panels.
  const model::transformer t(packed_test_model(true), dtype::bf16);
  temp_dir tmp;
  io::save_packed(t, tmp / "p");
  const io::native_layers src(tmp / "p");
  REQUIRE(src.embedding_apart());
  const std::size_t begin = src.tensors().info("lm_head").begin;
  std::fstream f(tmp / "p/model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
  std::uint64_t header = 0;
  f.read(reinterpret_cast<char*>(&header), 8);
  f.seekp(std::streamoff(8 + header + begin));
  const std::uint16_t other = 0x3f80;  // 1.0, not what the embedding's first value rounds to
  f.write(reinterpret_cast<const char*>(&other), 2);
  f.close();
  CHECK_THROWS_WITH(io::load_transformer(tmp / "p"), Catch::Matchers::Contains("'lm_head' does not hold the values of 'tok_emb'"));
}

TEST_CASE("packed: panels another writer left misaligned are repacked, not mapped") {
  const model::transformer t(packed_test_model(false), dtype::f32);
  temp_dir tmp;
  io::save_packed(t, tmp / "p");
  // The same file with two more spaces of header: every tensor moves 2 bytes,
  // off the alignment of its F32 values (a layout the format allows).
  std::string bytes = file_bytes(tmp / "p/model.safetensors");
  std::uint64_t header = 0;
  std::memcpy(&header, bytes.data(), 8);
  bytes.insert(std::size_t(8 + header), "  ");
  header += 2;
  std::memcpy(&bytes[0], &header, 8);
  std::filesystem::copy(tmp / "p", tmp / "q");
  std::ofstream(tmp / "q/model.safetensors", std::ios::binary | std::ios::trunc) << bytes;
  const io::native_layers src(tmp / "q");
  CHECK_FALSE(io::maps_panels(src, std::nullopt));
  const std::vector<std::int32_t> tokens{4, 8, 15, 16, 23};
  CHECK(run_tokens(io::load_transformer(tmp / "q"), tokens).cwiseEqual(run_tokens(t, tokens)).all());
}
