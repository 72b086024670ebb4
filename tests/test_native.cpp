// The native model format: every kind of layer round-trips to identical bytes
// and identical outputs, a converted real model reloads bit-identically, and
// damaged directories or unsafe outputs fail clearly without losing anything.
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <fstream>
#include <iterator>
#include <set>

#include <nlohmann/json.hpp>

#include "../benchmarks/synthetic.hpp"
#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/io/hf.hpp"
#include "moeforge/convert/cmoe.hpp"
#include "moeforge/io/load.hpp"
#include "moeforge/io/native.hpp"
#include "moeforge/runtime/routing.hpp"
#include "support/everything_model.hpp"
#include "support/random.hpp"
#include "support/stories.hpp"
#include "support/temp_dir.hpp"
#include "support/util.hpp"

using namespace moeforge;
using namespace moeforge::test;

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

TEST_CASE("native: every field of a drop policy round-trips, so the reloaded layer drops the same pairs") {
  auto w = everything_model();
  auto& m1 = std::get<moe_layer>(w.layers[1].ffn);
  m1.router.drop.kind = drop_kind::two_t;
  m1.router.drop.threshold = 0.4f;
  m1.router.drop.margin = 0.13f;  // not the default margin, so a margin left unread shows
  m1.router.drop.expert_factor = {1.0f, 0.6f, 1.0f, 0.35f};
  temp_dir tmp;
  io::save_native(w, tmp / "a");
  const auto back = io::load_native(tmp / "a");
  const auto& d = std::get<moe_layer>(back.layers[1].ffn).router.drop;
  CHECK(d.kind == m1.router.drop.kind);
  CHECK(d.threshold == m1.router.drop.threshold);
  CHECK(d.margin == m1.router.drop.margin);
  CHECK(d.expert_factor == m1.router.drop.expert_factor);
  std::mt19937 rng(11);
  const matrix x = random_matrix(64, w.config.dim, rng, 1.0f);
  const auto want = runtime::select(m1, x), got = runtime::select(std::get<moe_layer>(back.layers[1].ffn), x);
  CHECK(got.work == want.work);
}

namespace {

// The stored type of every tensor of one safetensors file, by rank.
std::set<std::string> stored_types(const std::string& file, std::size_t rank) {
  std::set<std::string> out;
  const io::safetensors_file f(file);
  for (const auto& t : f.tensors())
    if (t.shape.size() == rank) out.insert(std::string(dtype_name(t.dtype)));
  return out;
}

}  // namespace

TEST_CASE("native and Hugging Face exports keep a BF16 or F16 model's matrices in their type, never rounding a value") {
  temp_dir tmp;
  const std::vector<std::int32_t> tokens{1, 5, 9, 33, 2, 17, 39, 0};
  // Every layer kind, as a BF16 model holds it: matrices exact in BF16.
  model::weights w = everything_model();
  io::detail::for_each_tensor(
      w, [](const std::string&, matrix& m) { m = rounded_to_bf16(m); }, [](const std::string&, vector&) {});
  w.weight_dtype = dtype::bf16;
  io::save_native(w, tmp / "bf16");
  CHECK(stored_types(tmp / "bf16/model.safetensors", 2) == std::set<std::string>{"BF16"});
  CHECK(stored_types(tmp / "bf16/model.safetensors", 1) == std::set<std::string>{"F32"});
  const model::weights back = io::load_native(tmp / "bf16");
  CHECK(back.weight_dtype == dtype::bf16);
  CHECK(logits(back, tokens).cwiseEqual(logits(w, tokens)).all());

  // One value that BF16 cannot hold: the whole model is written in F32, unrounded.
  model::weights edited = w;
  edited.layers[0].wq(1, 2) = std::nextafter(edited.layers[0].wq(1, 2), 1.0f);
  io::save_native(edited, tmp / "edited");
  CHECK(stored_types(tmp / "edited/model.safetensors", 2) == std::set<std::string>{"F32"});
  CHECK(io::load_native(tmp / "edited").layers[0].wq == edited.layers[0].wq);

  // A BF16 or F16 Hugging Face checkpoint exported both ways stays in its
  // type and reloads to the same logits (F16 weights run as F32).
  for (const dtype type : {dtype::bf16, dtype::f16}) {
    const std::string name(dtype_name(type));
    CAPTURE(name);
    const std::string dir = tmp / name;
    bench::write_synthetic_hf(bench::find_shape("tiny"), 2, type, 1, 5, dir + "/hf", 64);
    const model::weights hf = io::load_model(dir + "/hf");
    const dtype runs_as = type == dtype::f16 ? dtype::f32 : type;
    REQUIRE(hf.weight_dtype == runs_as);
    REQUIRE(hf.file_dtype == type);
    io::save_hf(hf, dir + "/hf2");
    io::save_native(hf, dir + "/native");
    CHECK(nlohmann::json::parse(std::ifstream(dir + "/hf2/config.json"))["torch_dtype"] == std::string(torch_dtype_name(type)));
    for (const char* out : {"hf2", "native"}) {
      CAPTURE(out);
      CHECK(stored_types(dir + "/" + out + "/model.safetensors", 2) == std::set<std::string>{name});
      const model::weights again = io::load_model(dir + "/" + out);
      CHECK(again.weight_dtype == runs_as);
      CHECK(again.file_dtype == type);
      CHECK(logits(again, tokens).cwiseEqual(logits(hf, tokens)).all());
    }
  }
  // An F16 model edited in F32 (a value F16 cannot hold) is written in F32.
  model::weights f16 = io::load_model(tmp / "F16/hf");
  f16.layers[0].wq(1, 2) = std::nextafter(f16.layers[0].wq(1, 2), 1.0f);
  io::save_native(f16, tmp / "f16-edited");
  CHECK(stored_types(tmp / "f16-edited/model.safetensors", 2) == std::set<std::string>{"F32"});
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
  // A provenance string that is not UTF-8 (a Linux path may hold any byte) is written, not thrown on.
  io::save_native(w, out, {{"version", "third"}, {"source", "/data/model-\xff.bin"}}, overwrite);
  CHECK(io::read_native_manifest(out)["provenance"]["source"] == "/data/model-\xef\xbf\xbd.bin");
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

TEST_CASE("native: a directory that appears while a model is written is left alone unless overwriting; overwriting swaps it whole") {
  namespace fs = std::filesystem;
  temp_dir tmp;
  const auto staged = [&](const std::string& name, const std::string& text) {
    fs::create_directories(tmp / name);
    std::ofstream(tmp / name + "/file") << text;
    return fs::path(tmp / name);
  };
  const auto text_in = [&](const std::string& dir) {
    std::ifstream in(tmp / dir + "/file");
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  // The output was checked to be free before writing began; then another run made it.
  staged("out", "another run's model");
  const auto ours = staged(".out.tmp", "this run's model");
  CHECK_THROWS_WITH(io::detail::move_into_place(ours, tmp / "out", false), Catch::Contains("appeared while it was being written"));
  CHECK(text_in("out") == "another run's model");
  CHECK(fs::exists(ours));
  io::detail::move_into_place(ours, tmp / "out", true);
  CHECK(text_in("out") == "this run's model");
  CHECK_FALSE(fs::exists(ours));
  // Nothing else is left beside it (the old directory is removed).
  CHECK(std::distance(fs::directory_iterator(tmp.path()), {}) == 1);
  io::detail::move_into_place(staged(".new.tmp", "new"), tmp / "new", false);
  CHECK(text_in("new") == "new");
}

TEST_CASE("native: what killed runs left beside an output goes with the next write of it; what a live run writes stays") {
  namespace fs = std::filesystem;
  const auto long_ago = fs::file_time_type::clock::now() - std::chrono::minutes(5);
  temp_dir tmp;
  // Process IDs other than this one's (whose own staging directory the write replaces anyway).
  const auto pid = [](long n) { return std::to_string(n == ::getpid() ? n + 100 : n); };
  const auto aged = [&](const std::string& name, bool old) {
    if (old) fs::last_write_time(tmp / name, long_ago);
    return fs::path(tmp / name);
  };
  const auto leftover = [&](const std::string& name, bool old) {
    fs::create_directories(tmp / name);
    std::ofstream(tmp / name + "/model.safetensors") << "half a model";
    return aged(name, old);
  };
  const auto killed = leftover(".model.tmp." + pid(4000001), true);
  const auto just_made = leftover(".model.tmp." + pid(4000002), false);  // its writer may not have locked it yet
  const auto writing = leftover(".model.tmp." + pid(4000003), true);
  const auto other_output = leftover(".other.tmp." + pid(4000004), true);
  const auto not_a_pid = leftover(".model.tmp.backup", true);
  const auto dated_copy = leftover(".model.tmp.20240101", true);  // past the largest process ID
  std::ofstream(tmp / (".model.tmp." + pid(4000005))) << "a file, where staging makes directories";
  const auto a_file = aged(".model.tmp." + pid(4000005), true);
  REQUIRE(::mkfifo((tmp / (".model.tmp." + pid(4000006))).c_str(), 0600) == 0);  // opened to be locked, it must not block
  const auto a_fifo = aged(".model.tmp." + pid(4000006), true);
  {
    const moeforge::detail::held_lock writer(writing);
    REQUIRE(writer.held());
    io::save_native(everything_model(), tmp / "model");
    CHECK_FALSE(fs::exists(killed));
    CHECK(fs::exists(writing));
  }
  for (const auto& kept : {just_made, other_output, not_a_pid, dated_copy, a_file, a_fifo}) {
    CAPTURE(kept);
    CHECK(fs::exists(fs::symlink_status(kept)));
  }
  // A run's own staging directory is locked while it lives: old or not, another run's sweep leaves it.
  {
    io::detail::staging_dir stage(tmp / "again");
    fs::last_write_time(stage.path(), long_ago);
    moeforge::detail::remove_abandoned(tmp.path(), ".again.tmp.", fs::file_type::directory);
    CHECK(fs::exists(stage.path()));
    CHECK(moeforge::detail::held_lock(stage.path()).busy());
  }
  // A single file's temporary likewise.
  const std::string half = tmp / ("t.safetensors.tmp." + pid(4000007));
  std::ofstream(half) << "half a file";
  fs::last_write_time(half, long_ago);
  const float value = 1.5f;
  io::write_safetensors(tmp / "t.safetensors", {{"x", {1}, &value}});
  CHECK_FALSE(fs::exists(half));
  CHECK(io::safetensors_file(tmp / "t.safetensors").read("x") == std::vector<float>{1.5f});
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
  SECTION("a number that is not exactly of its field's type") {
    // nlohmann's get<int> takes 64.9 as 64 and 4294967298 as 2: each would load as another model.
    for (const auto& bad : std::vector<std::pair<std::string, nlohmann::json>>{
             {"dim", 64.9}, {"n_layers", true}, {"eos_token", std::int64_t(4294967298)}, {"bos_token", -2147483649.0}}) {
      const std::string& field = bad.first;  // (a lambda may not capture a structured binding in C++17)
      const nlohmann::json& value = bad.second;
      INFO(field << " = " << value.dump());
      edit_manifest([&](auto& j) { j["config"][field] = value; });
      CHECK_THAT(message(), Contains("config." + field) && Contains("wrong type"));
    }
    edit_manifest([](auto& j) { j["version"] = 1.9; });
    CHECK_THAT(message(), Contains("version") && Contains("wrong type"));
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
