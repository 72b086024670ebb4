// Streaming conversion (convert/stream.hpp): a sharded checkpoint converted
// one layer at a time gives exactly the in-memory conversion, survives a stop
// and a resume, never shows a half-written output, and refuses damaged input
// before writing anything.
#include <catch2/catch.hpp>

#include <linux/capability.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "../benchmarks/synthetic.hpp"
#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/convert/stream.hpp"
#include "moeforge/io/load.hpp"
#include "support/hf_checkpoint.hpp"
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

/// `got` has every tensor of `want`, in order, bit for bit, or (BF16 or F16
/// stored) rounded to nearest even from want's FP32.
void check_stream_tensors(const model::weights& got, const model::weights& want, dtype stored) {
  const auto a = named_tensors(got), b = named_tensors(want);
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    CAPTURE(a[i].first);
    REQUIRE(a[i].first == b[i].first);
    CHECK(a[i].second == rounded_to(stored, b[i].second));
  }
}

std::vector<std::string> stream_listing(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

/// `b` holds the model `a` does: the same files, each but the manifest byte
/// for byte, and the manifest's config and layers.
void require_same_output(const fs::path& a, const fs::path& b) {
  REQUIRE(stream_listing(a) == stream_listing(b));
  for (const auto& f : stream_listing(a)) {
    CAPTURE(f);
    if (f != "moeforge.json") CHECK(file_bytes((a / f).string()) == file_bytes((b / f).string()));
  }
  const auto ma = read_json((a / "moeforge.json").string()), mb = read_json((b / "moeforge.json").string());
  CHECK(ma["config"] == mb["config"]);
  CHECK(ma["layers"] == mb["layers"]);
}

/// A BF16 checkpoint of two shards and its uninterrupted CMoE conversion in
/// dir/whole, for the resume tests to compare with.
struct converted_source {
  temp_dir dir;
  std::string src = sharded_hf(dir, "src", dtype::bf16, 2);
  std::vector<std::vector<std::int32_t>> win = stream_windows();
  convert::stream_options so = [] {
    convert::stream_options o;
    o.shard_bytes = 30'000;
    return o;
  }();
  converted_source() { convert::cmoe_stream(src, win, dir / "whole", stream_cmoe(), so); }
};

}  // namespace

TEST_CASE("a streamed conversion of a sharded checkpoint is bit-identical to the in-memory conversion", "[stream]") {
  temp_dir dir;
  const auto stored = GENERATE(dtype::f32, dtype::bf16, dtype::f16);
  CAPTURE(dtype_name(stored));
  const std::string src = sharded_hf(dir, "src", stored, 3);
  const auto win = stream_windows();

  model::weights want = io::load_model(src);
  CHECK(want.weight_dtype == (stored == dtype::f16 ? dtype::f32 : stored));  // F16 runs as F32
  const dtype source = want.stored_dtype();
  CHECK(source == stored);
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

  check_stream_tensors(io::load_model(dir / "out"), want, stored);
  CHECK(stream_listing(dir.path()) == std::vector<std::string>{"out", "src", "src.single"});
  // The in-memory conversion saved in the source's type (as the command
  // line's in-memory path saves it) stores the same values.
  io::native_save_options as_source;
  as_source.stored = source;
  as_source.as_source = true;
  io::save_native(want, dir / "in-memory", {}, as_source);
  check_stream_tensors(io::load_model(dir / "in-memory"), want, stored);
}

TEST_CASE("a checkpoint mixing types keeps each tensor's through both conversions and a native reload", "[stream]") {
  // F32 norms, head and FFN beside BF16 attention and embedding: CMoE's experts and routers come from the F32 FFN.
  temp_dir dir;
  const std::string src =
      sharded_hf(dir, "src", dtype::bf16, 2, {}, false, 64, [](const std::string& name) { return kept_in_f32(name) || name.find(".mlp.") != std::string::npos; });
  const auto in_f32 = [](const std::string& name) { return norm_or_head(name) || name.find(".moe.") != std::string::npos; };
  const auto win = stream_windows();
  const model::weights source = io::load_model(src);
  // Values BF16 cannot hold: a conversion that rounded them would show.
  for (const vector& v : {source.layers[0].attn_norm, vector(source.lm_head.row(0).transpose())})
    REQUIRE_FALSE(exact_in(dtype::bf16, v.data(), std::size_t(v.size())));
  model::weights want = source;
  convert::cmoe_model(want, [&](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, win); }, stream_cmoe());
  io::native_save_options as_source;
  as_source.stored = source.stored_dtype();
  as_source.as_source = true;
  io::save_native(want, dir / "in-memory", {}, as_source);
  CHECK(convert::cmoe_stream(src, win, dir / "streamed", stream_cmoe(), {}).complete);
  // The native reader records types too: the conversion saved again keeps them.
  io::save_native(io::load_model(dir / "in-memory"), dir / "again", {}, as_source);

  for (const char* out : {"in-memory", "streamed", "again"}) check_stored_types(dir / out, dtype::bf16, in_f32);
  const auto got = io::load_model(dir / "in-memory");
  for (const char* out : {"streamed", "again"}) {
    const auto a = named_tensors(io::load_model(dir / out)), b = named_tensors(got);
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
      CAPTURE(out, a[i].first);
      REQUIRE(a[i].first == b[i].first);
      CHECK(a[i].second == b[i].second);
    }
  }
  CHECK(got.layers[0].attn_norm == source.layers[0].attn_norm);
  CHECK(got.lm_head == source.lm_head);
}

TEST_CASE("a conversion stopped after a layer and resumed writes the identical model; other options or tokens are refused", "[stream]") {
  const converted_source c;
  convert::stream_options stop = c.so;
  stop.stop_after_layers = 2;
  const auto first = convert::cmoe_stream(c.src, c.win, c.dir / "resumed", stream_cmoe(), stop);
  CHECK_FALSE(first.complete);
  // Only the hidden partial directory exists: never a half model at the output.
  CHECK_FALSE(fs::exists(c.dir / "resumed"));
  CHECK(fs::exists(c.dir / ".resumed.partial/progress.json"));
  // CMoE's method fingerprint is its options alone, as before methods were named in it: older partial directories still resume.
  CHECK(read_json(c.dir / ".resumed.partial/progress.json")["fingerprint"]["method"] == convert::to_json(stream_cmoe()));

  CHECK_REJECTS(convert::cmoe_stream(c.src, c.win, c.dir / "resumed", stream_cmoe(), c.so), io_error,
                Catch::Contains("interrupted conversion") && Catch::Contains(".resumed.partial"));
  convert::stream_options resume = c.so;
  resume.resume = true;
  auto other = stream_cmoe();
  other.seed = 5;
  CHECK_REJECTS(convert::cmoe_stream(c.src, c.win, c.dir / "resumed", other, resume), config_error,
                Catch::Contains("cannot resume") && Catch::Contains("method differs") && Catch::Contains("(seed: was 0, now 5)"));
  auto sized = stream_cmoe();
  sized.fit.size_rule = !sized.fit.size_rule;  // changes which fitting steps run on the later layers
  CHECK_REJECTS(convert::cmoe_stream(c.src, c.win, c.dir / "resumed", sized, resume), config_error, Catch::Contains("method differs"));
  auto fewer = c.win;
  fewer.pop_back();
  CHECK_REJECTS(convert::cmoe_stream(c.src, fewer, c.dir / "resumed", stream_cmoe(), resume), config_error, Catch::Contains("calibration differs"));

  const auto rest = convert::cmoe_stream(c.src, c.win, c.dir / "resumed", stream_cmoe(), resume);
  CHECK(rest.complete);
  CHECK(rest.resumed_at == 2);
  CHECK_FALSE(fs::exists(c.dir / ".resumed.partial"));
  require_same_output(c.dir / "whole", c.dir / "resumed");
  CHECK(read_json(c.dir / "resumed/moeforge.json")["provenance"]["layers"].size() == 3);
}

TEST_CASE("a conversion interrupted while finishing is finished by a resume, not redone; leftovers stay out of the output", "[stream]") {
  const converted_source c;
  // Another run takes the output while the last layer is written: the
  // finished model must wait in the partial directory for a resume.
  convert::stream_options racing = c.so;
  racing.progress = [&](const convert::layer_progress& p) {
    if (p.stage == "done" && p.layer + 1 == p.layers) fs::create_directories(c.dir / "out/other");
  };
  CHECK_THROWS_WITH(convert::cmoe_stream(c.src, c.win, c.dir / "out", stream_cmoe(), racing), Catch::Contains("appeared during the conversion"));
  const fs::path stage = c.dir / ".out.partial";
  REQUIRE(read_json(stage / "progress.json")["layers_done"] == 3);
  fs::remove_all(c.dir / "out");
  // As if killed between the shards' renames: the first and the last one back under their interim names.
  const auto shards = stream_listing(stage);
  REQUIRE(std::count_if(shards.begin(), shards.end(), [](const std::string& f) { return f.rfind("model-0", 0) == 0; }) >= 2);
  const auto shard_names = [&] {
    std::vector<std::string> out;
    for (const auto& f : stream_listing(stage))
      if (f.rfind("model-0", 0) == 0) out.push_back(f);
    return out;
  }();
  fs::rename(stage / shard_names.front(), stage / "shard-1.part");
  fs::rename(stage / shard_names.back(), stage / ("shard-" + std::to_string(shard_names.size()) + ".part"));
  // ... and what kills between two other steps leave: an older checkpoint's hidden states, a temporary file.
  std::ofstream(stage / "hidden-1.safetensors") << "stale";
  std::ofstream(stage / "hidden-2.safetensors.tmp.123") << "stale";
  convert::stream_options resume = c.so;
  resume.resume = true;
  const auto rest = convert::cmoe_stream(c.src, c.win, c.dir / "out", stream_cmoe(), resume);
  CHECK(rest.complete);
  CHECK(rest.resumed_at == 3);  // nothing converted again
  CHECK_FALSE(fs::exists(stage));
  require_same_output(c.dir / "whole", c.dir / "out");
}

TEST_CASE("a resume refuses a damaged progress file and a source whose weights changed", "[stream]") {
  temp_dir dir;
  const std::string src = sharded_hf(dir, "src", dtype::bf16, 2);
  const auto win = stream_windows();
  convert::stream_options stop;
  stop.shard_bytes = 30'000;
  stop.stop_after_layers = 2;
  convert::cmoe_stream(src, win, dir / "out", stream_cmoe(), stop);
  const fs::path progress = dir / ".out.partial/progress.json";
  const auto saved = read_json(progress);
  convert::stream_options resume = stop;
  resume.stop_after_layers = -1;
  resume.resume = true;
  for (const int done : {9, -1, 1}) {  // past the layers, negative, or not what its reports and manifests say
    INFO(done);
    auto damaged = saved;
    damaged["layers_done"] = done;
    write_json(progress, damaged);
    CHECK_REJECTS(convert::cmoe_stream(src, win, dir / "out", stream_cmoe(), resume), format_error,
                  Catch::Contains("progress.json") && Catch::Contains("damaged"));
  }
  write_json(progress, saved);
  // Another checkpoint of the same architecture: the same names, shapes and sizes, other weights.
  std::string shard;
  for (const auto& f : stream_listing(src))
    if (f.size() > 12 && f.compare(f.size() - 12, 12, ".safetensors") == 0) shard = src + "/" + f;
  REQUIRE_FALSE(shard.empty());
  {
    std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
    std::uint64_t header = 0;
    f.read(reinterpret_cast<char*>(&header), 8);
    f.seekp(std::streamoff(8 + header));
    const char other[4] = {1, 2, 3, 4};
    f.write(other, 4);
  }
  CHECK_REJECTS(convert::cmoe_stream(src, win, dir / "out", stream_cmoe(), resume), config_error, Catch::Contains("model differs"));
}

namespace {

/// Flips the lowest bit of a value in the middle of tensor `name` of the
/// checkpoint `src`, in place: a change the model's sampled fingerprint
/// cannot see (the value stays finite).
void flip_middle_bit(const std::string& src, const std::string& name) {
  std::string file;
  std::size_t at = 0;
  {
    const io::safetensors_checkpoint ck(src);
    const auto& t = ck.info(name);
    file = ck.file(name);
    at = t.begin + (t.end - t.begin) / 4 * 2;  // a whole BF16 or F32 value's low byte
  }
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  std::uint64_t header = 0;
  f.read(reinterpret_cast<char*>(&header), 8);
  const auto pos = std::streamoff(8 + header + at);
  char byte = 0;
  f.seekg(pos);
  f.read(&byte, 1);
  byte = char(byte ^ 1);
  f.seekp(pos);
  f.write(&byte, 1);
  REQUIRE(f.good());
}

}  // namespace

TEST_CASE("a resume checks every byte the finished layers came from, converts a changed later layer as new, and waits for no other run", "[stream]") {
  const converted_source c;
  convert::stream_options stop = c.so;
  stop.stop_after_layers = 2;
  convert::stream_options resume = c.so;
  resume.resume = true;
  const fs::path progress = c.dir / ".out.partial/progress.json";
  const auto start = [&] {
    fs::remove_all(c.dir / ".out.partial");
    convert::cmoe_stream(c.src, c.win, c.dir / "out", stream_cmoe(), stop);
  };

  start();
  {
    const moeforge::detail::held_lock other_run(c.dir / ".out.partial");
    REQUIRE(other_run.held());
    CHECK_REJECTS(convert::cmoe_stream(c.src, c.win, c.dir / "out", stream_cmoe(), resume), io_error,
                  Catch::Contains("another conversion is writing into") && Catch::Contains(".out.partial"));
  }
  {  // Another run that has just begun: its partial directory holds no progress yet, and stays.
    fs::create_directories(c.dir / ".fresh.partial");
    const moeforge::detail::held_lock other_run(c.dir / ".fresh.partial");
    CHECK_REJECTS(convert::cmoe_stream(c.src, c.win, c.dir / "fresh", stream_cmoe(), c.so), io_error, Catch::Contains("another conversion is writing into"));
    CHECK(fs::exists(c.dir / ".fresh.partial"));
  }
  flip_middle_bit(c.src, "model.layers.1.mlp.down_proj.weight");
  CHECK_REJECTS(convert::cmoe_stream(c.src, c.win, c.dir / "out", stream_cmoe(), resume), config_error,
                Catch::Contains("cannot resume") && Catch::Contains("layer 1's tensors") && Catch::Contains("changed since that layer was converted"));
  flip_middle_bit(c.src, "model.layers.1.mlp.down_proj.weight");

  flip_middle_bit(c.src, "model.embed_tokens.weight");
  CHECK_REJECTS(convert::cmoe_stream(c.src, c.win, c.dir / "out", stream_cmoe(), resume), config_error,
                Catch::Contains("cannot resume") && Catch::Contains("embedding, final norm or classifier"));
  flip_middle_bit(c.src, "model.embed_tokens.weight");

  auto saved = read_json(progress);
  saved.erase("sources");
  write_json(progress, saved);
  CHECK_REJECTS(convert::cmoe_stream(c.src, c.win, c.dir / "out", stream_cmoe(), resume), format_error,
                Catch::Contains("older moeforge") && Catch::Contains(".out.partial"));

  // A layer not converted yet may change (where the model's fingerprint does not sample it, inside a tensor):
  // the resumed model is then the new source's conversion.
  start();
  flip_middle_bit(c.src, "model.layers.2.mlp.up_proj.weight");
  CHECK(convert::cmoe_stream(c.src, c.win, c.dir / "out", stream_cmoe(), resume).complete);
  convert::cmoe_stream(c.src, c.win, c.dir / "fresh", stream_cmoe(), c.so);
  require_same_output(c.dir / "fresh", c.dir / "out");
  bool changed = false;  // (and is not the old source's)
  const fs::path out = c.dir / "out", whole = c.dir / "whole";
  for (const auto& f : stream_listing(out)) changed = changed || file_bytes((out / f).string()) != file_bytes((whole / f).string());
  CHECK(changed);
}

namespace {

/// While alive, the calling thread cannot write a file its mode forbids even
/// as root: CAP_DAC_OVERRIDE is taken out of the thread's effective set (and
/// put back after; it stays permitted). Without root it changes nothing:
/// such a thread never had the capability.
class without_dac_override {
 public:
  without_dac_override() {
    if (::geteuid() != 0) return;
    header_.version = _LINUX_CAPABILITY_VERSION_3;
    REQUIRE(::syscall(SYS_capget, &header_, data_) == 0);
    saved_ = data_[0].effective;
    data_[0].effective &= ~(1u << CAP_DAC_OVERRIDE);
    REQUIRE(::syscall(SYS_capset, &header_, data_) == 0);
    dropped_ = true;
  }
  ~without_dac_override() {
    if (!dropped_) return;
    data_[0].effective = saved_;
    ::syscall(SYS_capset, &header_, data_);
  }
  without_dac_override(const without_dac_override&) = delete;
  without_dac_override& operator=(const without_dac_override&) = delete;

 private:
  __user_cap_header_struct header_{};
  __user_cap_data_struct data_[2]{};
  std::uint32_t saved_ = 0;
  bool dropped_ = false;
};

}  // namespace

TEST_CASE("a resume finishes over a read-only attachment an interrupted copy left in the partial directory", "[stream]") {
  // copy_file gives the copy its source's permissions before it writes a
  // byte: a run killed (or out of space) while copying a read-only tokenizer
  // leaves an empty read-only file in the partial directory, which a user
  // without root's override cannot open for writing again.
  temp_dir dir;
  const std::string src = sharded_hf(dir, "src", dtype::bf16, 2);
  const std::string tok = dir / "tok.bin";
  std::ofstream(tok) << "tokenizer bytes";
  fs::permissions(tok, fs::perms::owner_read | fs::perms::group_read | fs::perms::others_read);
  convert::stream_options stop;
  stop.shard_bytes = 30'000;
  stop.attachments = {{tok, "tokenizer.bin"}};
  stop.stop_after_layers = 1;
  convert::cmoe_stream(src, stream_windows(), dir / "out", stream_cmoe(), stop);
  const fs::path left = dir / ".out.partial/tokenizer.bin";
  std::ofstream{left};
  fs::permissions(left, fs::perms::owner_read | fs::perms::group_read | fs::perms::others_read);
  convert::stream_options resume = stop;
  resume.stop_after_layers = -1;
  resume.resume = true;
  {
    // The manifest and its attachments are written on the calling thread.
    const without_dac_override user;
    convert::cmoe_stream(src, stream_windows(), dir / "out", stream_cmoe(), resume);
  }
  CHECK(file_bytes(dir / "out/tokenizer.bin") == "tokenizer bytes");
  CHECK_FALSE(fs::exists(dir / ".out.partial"));
}

TEST_CASE("a streamed conversion never clobbers an existing output and replaces it only when asked, once complete", "[stream]") {
  temp_dir dir;
  const std::string src = sharded_hf(dir, "src", dtype::f32, 2);
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
    const std::string src = sharded_hf(dir, "src", dtype::bf16, 3);
    fs::remove(src + "/model-00002-of-00003.safetensors");
    refuses(src, Catch::Contains("cannot open") && Catch::Contains(src + "/model-00002-of-00003.safetensors"), io_error(""));
  }
  SECTION("a tensor missing") {
    const std::string src = sharded_hf(dir, "src", dtype::f32, 3, {"model.layers.2.mlp.up_proj.weight", ""});
    refuses(src, Catch::Contains(src) && Catch::Contains("missing tensor 'model.layers.2.mlp.up_proj.weight'"), format_error(""));
  }
  SECTION("a tensor of the wrong shape") {
    const std::string src = sharded_hf(dir, "src", dtype::f32, 3, {"", "model.layers.1.mlp.down_proj.weight"});
    refuses(src, Catch::Contains("model-0000") && Catch::Contains("tensor 'model.layers.1.mlp.down_proj.weight' has shape [48, 32], expected [32, 48]"),
            shape_error(""));
  }
  SECTION("a truncated shard") {
    const std::string src = sharded_hf(dir, "src", dtype::bf16, 3);
    const std::string shard = src + "/model-00003-of-00003.safetensors";
    fs::resize_file(shard, fs::file_size(shard) - 100);
    refuses(src, Catch::Contains(shard) && Catch::Contains("exceed the data"), format_error(""));
  }
  SECTION("an unknown dtype") {
    const std::string src = sharded_hf(dir, "src", dtype::f32, 3);
    const std::string shard = src + "/model-00001-of-00003.safetensors";
    std::string bytes = file_bytes(shard);
    bytes.replace(bytes.find("\"F32\""), 5, "\"F99\"");
    std::ofstream(shard, std::ios::binary) << bytes;
    refuses(src, Catch::Contains(shard) && Catch::Contains("unknown dtype 'F99'"), format_error(""));
  }
}

namespace {

/// One MoE method, streamed and in memory, with the options a case gives it.
struct moe_method_case {
  std::string name;
  std::function<convert::stream_report(const std::string& src, const std::string& out, const convert::stream_options&)> stream;
  std::function<void(model::weights&)> in_memory;
};

moe_method_case dualsparse_case(const convert::dualsparse_options& o, const std::vector<std::vector<std::int32_t>>& win) {
  return {"dualsparse",
          [=](const std::string& src, const std::string& out, const convert::stream_options& so) { return convert::dualsparse_stream(src, win, out, o, so); },
          [=](model::weights& w) { convert::dualsparse_model(w, [&](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, win); }, o); }};
}

moe_method_case mone_case(const convert::mone_options& o, const std::vector<std::vector<std::int32_t>>& win) {
  return {"mone", [=](const std::string& src, const std::string& out, const convert::stream_options& so) { return convert::mone_stream(src, win, out, o, so); },
          [=](model::weights& w) { convert::mone_model(w, [&](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, win); }, o); }};
}

/// Layer-scope DualSparse: reconstruction, a partition, 2t calibrated to a drop rate, load-aware groups.
convert::dualsparse_options stream_dualsparse() {
  convert::dualsparse_options o;
  o.partition = 2;
  o.metric = calib::importance_metric::abs_act;
  o.policy.kind = drop_kind::two_t;
  o.drop_rate = 0.2;
  o.scope = convert::drop_scope::layer;
  o.groups = 2;
  return o;
}

convert::mone_options stream_mone(convert::mone_method method, bool sequential) {
  convert::mone_options o;
  o.method = method;
  o.count = 1;
  o.seed = 3;
  o.sequential = sequential;
  return o;
}

}  // namespace

TEST_CASE("streamed DualSparse and MoNE at layer scope are bit-identical to their in-memory conversions", "[stream]") {
  temp_dir dir;
  const auto win = stream_windows();
  // MoNE random draws from each layer's own stream, and with unpruned inputs
  // the next layer calibrates on the untouched FFN: both need the real layer.
  auto unpruned = stream_dualsparse();
  unpruned.sequential = false;
  // Global scope with a threshold given calibrates nothing across layers: it streams as well.
  auto global_fixed = stream_dualsparse();
  global_fixed.scope = convert::drop_scope::global;
  global_fixed.drop_rate.reset();
  global_fixed.threshold = 0.3;
  const std::vector<moe_method_case> cases{dualsparse_case(stream_dualsparse(), win), mone_case(stream_mone(convert::mone_method::mone, true), win),
                                           mone_case(stream_mone(convert::mone_method::random, false), win), dualsparse_case(unpruned, win),
                                           dualsparse_case(global_fixed, win)};
  const auto [which, stored] =
      GENERATE(table<std::size_t, dtype>({{0, dtype::f32}, {0, dtype::bf16}, {1, dtype::bf16}, {2, dtype::f32}, {3, dtype::f32}, {4, dtype::f32}}));
  const auto& c = cases[which];
  CAPTURE(c.name, dtype_name(stored));
  const std::string src = sharded_hf(dir, "src", stored, 3, {}, true);

  model::weights want = io::load_model(src);
  c.in_memory(want);
  convert::stream_options so;
  so.shard_bytes = 20'000;
  const auto rep = c.stream(src, dir / "out", so);
  CHECK(rep.complete);
  REQUIRE(rep.layers.size() == 3);
  for (std::size_t l = 0; l < 3; ++l) CHECK(rep.layers[l].at("layer") == l);

  const model::weights got = io::load_model(dir / "out");
  for (std::size_t l = 0; l < 3; ++l) {
    CAPTURE(l);
    // The manifest's layer: drop policy and thresholds, sub-expert cuts, major widths, pruned slots.
    CHECK(io::detail::layer_json(got.layers[l]) == io::detail::layer_json(want.layers[l]));
  }
  check_stream_tensors(got, want, stored);
  CHECK(read_json(dir / "out/moeforge.json")["provenance"]["method"] == c.name);
}

TEST_CASE("a streamed MoE method resumes to the identical model and refuses changed options or another method", "[stream]") {
  temp_dir dir;
  const auto win = stream_windows();
  const std::string src = sharded_hf(dir, "src", dtype::f32, 2, {}, true);
  const auto ds = stream_dualsparse();
  convert::stream_options so;
  so.shard_bytes = 30'000;
  convert::dualsparse_stream(src, win, dir / "whole", ds, so);

  convert::stream_options stop = so;
  stop.stop_after_layers = 1;
  CHECK_FALSE(convert::dualsparse_stream(src, win, dir / "resumed", ds, stop).complete);
  convert::stream_options resume = so;
  resume.resume = true;
  auto other = ds;
  other.drop_rate = 0.3;
  CHECK_REJECTS(convert::dualsparse_stream(src, win, dir / "resumed", other, resume), config_error,
                Catch::Contains("cannot resume") && Catch::Contains("method differs") && Catch::Contains("(options/drop_rate: was ") && Catch::EndsWith(", now 0.3)"));
  CHECK_REJECTS(convert::mone_stream(src, win, dir / "resumed", stream_mone(convert::mone_method::mone, true), resume), config_error,
                Catch::Contains("method differs"));
  CHECK(convert::dualsparse_stream(src, win, dir / "resumed", ds, resume).resumed_at == 1);
  REQUIRE(stream_listing(dir / "whole") == stream_listing(dir / "resumed"));
  for (const auto& f : stream_listing(dir / "whole")) {
    CAPTURE(f);
    if (f != "moeforge.json") CHECK(file_bytes(dir / ("whole/" + f)) == file_bytes(dir / ("resumed/" + f)));
  }
  CHECK(read_json(dir / "whole/moeforge.json")["layers"] == read_json(dir / "resumed/moeforge.json")["layers"]);
}

TEST_CASE("a resume refuses another method whose options look the same", "[stream]") {
  temp_dir dir;
  const auto win = stream_windows();
  const std::string src = sharded_hf(dir, "src", dtype::f32, 2, {}, true);
  // Methods that leave every layer as it is, with the same options (keys both CMoE's and MoNE's have): only their names differ.
  const auto method = [](const std::string& name) {
    return convert::stream_method{name, convert::layer_filter::moe, true, {{"method", "mone"}, {"seed", 3}},
                                  [](convert::layer_visit&) { return nlohmann::json(); }, {}};
  };
  convert::stream_options stop;
  stop.stop_after_layers = 1;
  CHECK_FALSE(convert::stream_convert(src, win, dir / "out", method("mone"), stop).complete);
  convert::stream_options resume;
  resume.resume = true;
  for (const std::string other : {"cmoe", "dualsparse"}) {
    CAPTURE(other);
    CHECK_REJECTS(convert::stream_convert(src, win, dir / "out", method(other), resume), config_error,
                  Catch::Contains("cannot resume") && Catch::Contains("method differs") && Catch::Contains("name: was \"mone\", now ") && Catch::Contains(other == "cmoe" ? "absent" : "\"dualsparse\""));
  }
  CHECK(convert::stream_convert(src, win, dir / "out", method("mone"), resume).resumed_at == 1);
}

TEST_CASE("streaming refuses what needs every layer at once, a method with nothing to convert and damaged MoE input, writing nothing", "[stream]") {
  temp_dir dir;
  const auto win = stream_windows();
  const std::string moe = sharded_hf(dir, "moe", dtype::f32, 2, {}, true);
  auto refuses = [&](auto&& run, auto matcher, auto type_tag) {
    using type = decltype(type_tag);
    CHECK_REJECTS(run(), type, matcher);
    CHECK_FALSE(fs::exists(dir / "out"));
    CHECK_FALSE(fs::exists(dir / ".out.partial"));
  };
  SECTION("DualSparse's global threshold, calibrated") {
    auto o = stream_dualsparse();  // a drop rate to calibrate to
    o.scope = convert::drop_scope::global;
    refuses([&] { return convert::dualsparse_stream(moe, win, dir / "out", o, {}); }, Catch::Contains("scope global") && Catch::Contains("scope layer"),
            config_error(""));
  }
  SECTION("MoNE's global ranking") {
    auto o = stream_mone(convert::mone_method::mone, true);
    o.scope = convert::mone_scope::global;
    refuses([&] { return convert::mone_stream(moe, win, dir / "out", o, {}); }, Catch::Contains("scope global") && Catch::Contains("scope layer"),
            config_error(""));
  }
  SECTION("a dense model") {
    const std::string dense = sharded_hf(dir, "dense", dtype::f32, 2);
    refuses([&] { return convert::dualsparse_stream(dense, win, dir / "out", stream_dualsparse(), {}); }, Catch::Contains("no MoE layer"), config_error(""));
    refuses([&] { return convert::mone_stream(dense, win, dir / "out", stream_mone(convert::mone_method::mone, true), {}); }, Catch::Contains("no MoE layer"),
            config_error(""));
  }
  SECTION("options the layers cannot take") {
    auto o = stream_mone(convert::mone_method::mone, true);
    o.count = 4;
    refuses([&] { return convert::mone_stream(moe, win, dir / "out", o, {}); }, Catch::Contains("count = 4") && Catch::Contains("layer 0"), config_error(""));
    auto d = stream_dualsparse();
    d.partition = 25;
    refuses([&] { return convert::dualsparse_stream(moe, win, dir / "out", d, {}); }, Catch::Contains("partition P = 25") && Catch::Contains("24 neurons"),
            config_error(""));
  }
  SECTION("an expert's tensor missing") {
    const std::string src = sharded_hf(dir, "src", dtype::f32, 3, {"model.layers.2.block_sparse_moe.experts.3.w2.weight", ""}, true);
    refuses([&] { return convert::mone_stream(src, win, dir / "out", stream_mone(convert::mone_method::mone, true), {}); },
            Catch::Contains(src) && Catch::Contains("missing tensor 'model.layers.2.block_sparse_moe.experts.3.w2.weight'"), format_error(""));
  }
}

TEST_CASE("make-model writes a sharded checkpoint that loads as the benchmark's in-memory synthetic model", "[stream]") {
  temp_dir dir;
  const auto& tiny = bench::find_shape("tiny");
  const auto stored = GENERATE(dtype::f32, dtype::bf16);
  CAPTURE(dtype_name(stored));
  bench::write_synthetic_hf(tiny, 2, stored, 3, 9, dir / "m");
  CHECK(io::safetensors_checkpoint(dir / "m").shards().size() == 3);
  check_stream_tensors(io::load_model(dir / "m"), bench::synthetic_model(tiny, 2, "", 9), stored);
  CHECK_REJECTS(bench::write_synthetic_hf(tiny, 2, stored, 3, 9, dir / "m"), io_error, Catch::Contains("already exists"));
}

namespace {

/// Prefill logits of a 40-token window (the many-token kernels), then three
/// one-token decode steps (the few-token ones), stacked.
matrix lean_logits(const model::transformer& tr) {
  std::vector<std::int32_t> tokens(40);
  for (std::size_t t = 0; t < tokens.size(); ++t) tokens[t] = std::int32_t((t * 37 + 5) % std::size_t(tr.config().vocab_size));
  auto cache = tr.new_cache();
  const matrix prefill = tr.forward(tokens, cache);
  matrix out(prefill.rows() + 3, prefill.cols());
  out.topRows(prefill.rows()) = prefill;
  for (index_t s = 0; s < 3; ++s) out.row(prefill.rows() + s) = tr.forward({std::int32_t(s + 1)}, cache).row(0);
  return out;
}

/// A small model exercising everything an owning transformer packs: tied
/// embeddings, attention biases, a dense layer and an MoE layer with a shared
/// gated expert, a novice, a partitioned expert, a 2t drop policy and novice
/// compensation.
model::weights lean_native_model() {
  std::mt19937 rng(5);
  model::weights w = bench::synthetic_model(bench::find_shape("tiny"), 2, "", 4, 64);
  w.config.tied_embeddings = true;
  w.lm_head = matrix();
  for (auto& l : w.layers) {
    l.bq = random_matrix(l.wq.rows(), 1, rng);
    l.bk = random_matrix(l.wk.rows(), 1, rng);
    l.bv = random_matrix(l.wv.rows(), 1, rng);
  }
  layer_spec spec;
  spec.hidden = w.config.dim;
  spec.widths = {13, 20, 7, 31};
  spec.shared = 1;
  spec.shared_gate = true;
  spec.novices = {2};
  moe_layer m = random_layer(spec, rng);
  m.router.top_k = 2;
  m.experts[1].parts = {8};
  m.router.drop.kind = drop_kind::two_t;
  m.router.drop.threshold = 0.4f;
  m.router.drop.margin = 0.1f;
  m.compensation.means = random_matrix(4, spec.hidden, rng, 0.01f);
  m.compensation.bias = m.compensation.means.colwise().sum().transpose();
  w.layers[1].ffn = std::move(m);
  return w;
}

}  // namespace

TEST_CASE("a model loaded layer by layer runs bit for bit as the owning transformer of the whole model, at every dtype", "[stream]") {
  temp_dir dir;
  // Dense LLaMA and Mixtral-style MoE Hugging Face checkpoints in 3 shards, and a native directory.
  const bench::model_shape tiny_moe{"tiny-moe", 64, 2, 4, 2, 256, 48, 4, 2};
  const int source = GENERATE(0, 1, 2);
  const auto stored = GENERATE(dtype::f32, dtype::bf16);
  std::string path = dir / "m";
  if (source == 2) {
    model::weights w = lean_native_model();
    if (stored == dtype::bf16) {
      io::detail::for_each_tensor(
          w, [](const std::string&, matrix& m) { m = rounded_to_bf16(m); }, [](const std::string&, vector&) {});
      w.weight_dtype = dtype::bf16;
    }
    io::save_native(w, path);
  } else {
    bench::write_synthetic_hf(source == 0 ? bench::find_shape("tiny") : tiny_moe, 2, stored, 3, 9, path, 64);
  }
  CAPTURE(source, dtype_name(stored));
  using format = runtime::detail::weight_format;
  for (const auto& run : {std::optional<format>(), std::optional<format>(dtype::f32), std::optional<format>(dtype::bf16)}) {
    CAPTURE(std::string(run ? dtype_name(run->type) : "auto"));
    const matrix lean = lean_logits(io::load_transformer(path, {}, run));
    CHECK(lean == lean_logits(model::transformer(io::load_model(path), run)));
  }
  // Against the plain-weights (lvalue) transformer, whose code this work left
  // alone: exact at the stored type when BF16 products keep F32 tokens.
  const model::weights plain = io::load_model(path);
  CHECK(lean_logits(io::load_transformer(path, {}, format(stored, false))) == lean_logits(model::transformer(plain)));
}

TEST_CASE("a weight handed out unread but never looked up is an error, not a model run on unwritten memory", "[stream]") {
  io::detail::unread_matrices unread;
  const matrix a(3, 4), b(2, 4), read(2, 4);
  const std::vector<float> file(20, 1.0f);
  unread.add(a, {file.data(), dtype::f32, 4, {}}, "layers.0.attention.wq.weight");
  unread.add(b, {file.data() + 12, dtype::f32, 4, {}}, "layers.0.attention.wk.weight");
  const auto lookup = unread.lookup();
  CHECK(lookup(a).data == file.data());
  CHECK(lookup(read).data == read.data());  // not handed out unread: its own values
  CHECK_THROWS_MATCHES(unread.clear(), std::logic_error,
                       Catch::Matchers::Message("moeforge: weight 'layers.0.attention.wk.weight' was handed out unread but never packed from its file"));
  CHECK(lookup(b).data == file.data() + 12);
  unread.clear();
  CHECK(lookup(a).data == a.data());  // forgotten
  unread.clear();
}

TEST_CASE("an owning transformer keeps no plain weight matrix, and a released one is never read as an empty FFN", "[stream]") {
  model::weights w = lean_native_model();
  const model::weights plain = w;
  const model::transformer tr(std::move(w));
  CHECK_THROWS_AS(tr.model(), config_error);
  const model::weights& s = tr.structure();
  CHECK(s.tok_emb.size() == 0);
  CHECK(s.layers[0].wq.size() == 0);
  CHECK(s.layers[0].bq == plain.layers[0].bq);  // what the forward pass reads in place stays
  const auto& dense = std::get<ffn>(s.layers[0].ffn);
  const auto& dense0 = std::get<ffn>(plain.layers[0].ffn);
  CHECK(dense.up.size() == 0);
  CHECK((dense.hidden() == dense0.hidden() && dense.intermediate() == dense0.intermediate() && dense.gated()));
  CHECK(parameter_count(dense) == parameter_count(dense0));
  CHECK(model::active_ffn_fraction(s) == model::active_ffn_fraction(plain));
  const auto& moe = std::get<moe_layer>(s.layers[1].ffn);
  CHECK(moe.experts[0].weights.up.size() == 0);
  CHECK(moe.experts[1].width() == 20);
  const matrix x = matrix::Ones(2, s.config.dim);
  CHECK_REJECTS(model::validate(s), shape_error, Catch::Contains("model.tok_emb: shape [0, 0]"));
  CHECK_REJECTS(runtime::dense_forward(dense, x), config_error, Catch::Contains("released"));
  CHECK_REJECTS(runtime::moe_forward(moe, x), config_error, Catch::Contains("released"));
  CHECK_REJECTS(select_neurons(dense, std::vector<index_t>{0}), config_error, Catch::Contains("released"));
  CHECK_REJECTS(model::validate(s.config, s.layers[0], 0), shape_error, Catch::Contains("model.layers[0].wq: shape [0, 0]"));
}

TEST_CASE("the layer readers read into a matrix pool's storage, so a load reuses the memory of the layer packed before", "[stream]") {
  temp_dir dir;
  const std::string hf = dir / "hf", native = dir / "native";
  bench::write_synthetic_hf(bench::find_shape("tiny"), 2, dtype::bf16, 3, 9, hf, 64);
  io::save_native(io::load_model(hf), native);
  for (const std::string& path : {hf, native}) {
    CAPTURE(path);
    const model::weights plain = io::load_model(path);
    io::with_layer_reader(path, {}, [&](auto&& src) {
      moeforge::detail::matrix_pool pool;
      model::layer first = src.layer(0, {}, &pool);
      auto& f = std::get<ffn>(first.ffn);
      const std::set<const float*> given{first.wq.data(), f.up.data()};
      pool.give(std::move(first.wq));
      pool.give(std::move(f.up));
      const model::layer second = src.layer(1, {}, &pool);
      const auto& g = std::get<ffn>(second.ffn);
      std::set<const float*> used;
      for (const matrix* m : {&second.wq, &second.wk, &second.wv, &second.wo, &g.gate, &g.up, &g.down}) used.insert(m->data());
      for (const float* p : given) CHECK(used.count(p) == 1);
      CHECK(pool.held() == 0);
      const auto& want = plain.layers[1];
      CHECK((second.wq == want.wq && second.wo == want.wo && g.gate == std::get<ffn>(want.ffn).gate && g.up == std::get<ffn>(want.ffn).up));
      return 0;
    });
  }
}

TEST_CASE("an owning transformer built layer by layer hands every plain matrix it packed to its sink", "[stream]") {
  model::weights w = lean_native_model();
  std::set<const float*> packed;  // the attention projections and FFN matrices; routers and norms stay in the structure
  for (std::size_t i = 0; i < w.layers.size(); ++i)
    io::detail::for_each_layer_tensor(
        i, w.layers[i],
        [&](const std::string& name, const matrix& m) {
          if (name.find(".router.") == std::string::npos && name.find(".compensation.") == std::string::npos && m.size()) packed.insert(m.data());
        },
        [](const std::string&, const vector&) {});
  REQUIRE(packed.size() > 8);
  std::set<const float*> given;
  model::weights globals = model::take_globals(w);
  const model::transformer tr(
      std::move(globals), [&](index_t li) { return std::move(w.layers[std::size_t(li)]); }, std::nullopt, {},
      [&](matrix&& m) {
        if (m.size()) given.insert(m.data());
      });
  CHECK(given == packed);
}
