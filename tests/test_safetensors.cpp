// safetensors: the writer's files read back identically and deterministically,
// hand-built F16/BF16 files widen exactly, sharded checkpoints resolve through
// their index, the writer never damages an existing file, and every kind of
// damaged file is rejected with a typed error naming the file, the tensor and
// what was expected.
#include <catch2/catch.hpp>

#include <sys/resource.h>

#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstring>
#include <fstream>
#include <iterator>

#include <nlohmann/json.hpp>

#include "moeforge/io/safetensors.hpp"
#include "support/temp_dir.hpp"
#include "support/util.hpp"

using namespace moeforge;
using namespace moeforge::test;

namespace {

std::vector<char> slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void put(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  REQUIRE(out.good());
}

void put_text(const std::string& path, const std::string& text) { put(path, std::vector<char>(text.begin(), text.end())); }

/// `[u64 LE header_length][header][data]`; header_length defaults to header.size().
std::vector<char> st_bytes(const std::string& header, const std::vector<char>& data = {}, std::int64_t header_length = -1) {
  const std::uint64_t n = header_length < 0 ? header.size() : std::uint64_t(header_length);
  std::vector<char> out(8);
  for (int i = 0; i < 8; ++i) out[std::size_t(i)] = char((n >> (8 * i)) & 0xff);
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::vector<char> zeros(std::size_t n) { return std::vector<char>(n, 0); }

template <class T>
std::vector<char> raw(const std::vector<T>& v) {
  std::vector<char> out(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(out.data(), v.data(), out.size());
  return out;
}

std::uint32_t bits(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

/// A file in `dir` holding `bytes`, opened by path.
io::safetensors_file open_bytes(const temp_dir& dir, const std::string& name, const std::vector<char>& bytes) {
  const auto path = dir / name;
  put(path, bytes);
  return io::safetensors_file(path);
}

std::vector<std::string> listing(const temp_dir& dir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

/// The header of one F32 tensor "w" of shape [2], 8 bytes of data.
const char* const one_tensor = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";

}  // namespace

// Checks the typed exception and that its message contains every fragment.
#define CHECK_REJECTS(expr, type, matcher) \
  do {                                     \
    CHECK_THROWS_AS(expr, type);           \
    CHECK_THROWS_WITH(expr, matcher);      \
  } while (0)

TEST_CASE("safetensors: write then read round-trips names, shapes, bytes and metadata") {
  temp_dir dir;
  const std::vector<float> a{1.0f, -2.5f, 3.25f, 0.0f, -0.0f, 1e-40f};  // 1e-40 is an F32 subnormal
  const std::vector<float> b{7.0f, std::nextafter(1.0f, 2.0f), -1e30f};
  const std::vector<float> s{42.0f};
  std::vector<io::tensor_view> views{{"layers.0.a", {2, 3}, a.data()},
                                     {"b", {3}, b.data()},
                                     {"scalar", {}, s.data()},
                                     {"empty", {0, 4}, nullptr},
                                     {"z.after_empty", {1, 3}, b.data()}};
  const auto path = dir / "model.safetensors";
  io::write_safetensors(path, views);

  const auto bytes = slurp(path);
  REQUIRE(bytes.size() >= 8);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | std::uint8_t(bytes[std::size_t(i)]);
  CHECK(n % 8 == 0);
  CHECK(bytes[8] == '{');
  CHECK(bytes.size() == 8 + n + 4 * (6 + 3 + 1 + 0 + 3));
  CHECK(listing(dir) == std::vector<std::string>{"model.safetensors"});  // no temp file left

  const io::safetensors_file f(path);
  CHECK(f.path() == path);
  CHECK(f.metadata() == std::map<std::string, std::string>{{"format", "pt"}});
  REQUIRE(f.tensors().size() == views.size());
  for (std::size_t i = 0; i < views.size(); ++i) {
    const auto& v = views[i];
    const auto& t = f.tensors()[i];  // sorted by offset = written order
    CHECK(t.name == v.name);
    CHECK(t.shape == v.shape);
    CHECK(t.dtype == dtype::f32);
    const auto got = f.read(v.name);
    REQUIRE(std::int64_t(got.size()) == t.numel());
    if (!got.empty()) CHECK(std::memcmp(got.data(), v.data, got.size() * 4) == 0);
  }
  CHECK(f.at("empty").begin == f.at("empty").end);

  const auto m = f.read_matrix("layers.0.a", 2, 3);
  CHECK(m(0, 0) == 1.0f);
  CHECK(m(0, 2) == 3.25f);  // row-major
  CHECK(m(1, 2) == 1e-40f);
  CHECK(f.read_vector("b", 3)(1) == std::nextafter(1.0f, 2.0f));

  // The same views give the same bytes, to a new file and over the old one.
  io::write_safetensors(dir / "again.safetensors", views);
  CHECK(slurp(dir / "again.safetensors") == bytes);
  io::write_safetensors(path, views);
  CHECK(slurp(path) == bytes);

  // The in-memory parser agrees with the mapped one.
  const auto mem = io::safetensors_file::from_buffer(bytes, "in-memory");
  CHECK(mem.path() == "in-memory");
  CHECK(mem.read("layers.0.a") == f.read("layers.0.a"));

  // Custom and empty metadata.
  io::write_safetensors(dir / "meta.safetensors", views, {{"k", "v"}, {"format", "np"}});
  CHECK(io::safetensors_file(dir / "meta.safetensors").metadata() == std::map<std::string, std::string>{{"format", "np"}, {"k", "v"}});
  io::write_safetensors(dir / "nometa.safetensors", views, {});
  CHECK(io::safetensors_file(dir / "nometa.safetensors").metadata().empty());

  // A checkpoint opened by file or by directory.
  const io::safetensors_checkpoint by_file(path), by_dir(dir.path().string());
  CHECK(by_file.names() == std::vector<std::string>{"b", "empty", "layers.0.a", "scalar", "z.after_empty"});
  CHECK(by_dir.read("b") == b);
  CHECK(by_dir.info("layers.0.a").shape == std::vector<std::int64_t>{2, 3});
}

TEST_CASE("safetensors: F16 and BF16 widen exactly to F32") {
  temp_dir dir;
  // F16: 1, -2.5, 65504 (max), 2^-24 (smallest subnormal), 1023 * 2^-24 (largest subnormal), -0, 2^-14 (smallest normal), inf
  const std::vector<std::uint16_t> h{0x3c00, 0xc100, 0x7bff, 0x0001, 0x03ff, 0x8000, 0x0400, 0x7c00};
  const std::vector<float> h_want{1.0f, -2.5f, 65504.0f, std::ldexp(1.0f, -24), std::ldexp(1023.0f, -24), -0.0f, std::ldexp(1.0f, -14),
                                  INFINITY};
  // BF16: 1, -2.5, largest finite, 2^-133 (smallest subnormal), 2^-126 (smallest normal), -inf
  const std::vector<std::uint16_t> bf{0x3f80, 0xc020, 0x7f7f, 0x0001, 0x0080, 0xff80};
  const std::vector<float> bf_want{1.0f, -2.5f, std::ldexp(255.0f, 120), std::ldexp(1.0f, -133), std::ldexp(1.0f, -126), -INFINITY};

  auto data = raw(h);
  const auto bf_raw = raw(bf);
  data.insert(data.end(), bf_raw.begin(), bf_raw.end());
  // An odd offset (16) for the BF16 tensor's 2-byte values is fine; the header is unpadded.
  const std::string header = R"({"half":{"dtype":"F16","shape":[2,4],"data_offsets":[0,16]},)"
                             R"("brain":{"dtype":"BF16","shape":[6],"data_offsets":[16,28]}})";
  const auto f = open_bytes(dir, "half.safetensors", st_bytes(header, data));
  CHECK(f.metadata().empty());
  CHECK(f.at("half").dtype == dtype::f16);
  CHECK(f.at("brain").dtype == dtype::bf16);
  const auto got_h = f.read("half");
  const auto got_bf = f.read("brain");
  REQUIRE(got_h.size() == h_want.size());
  REQUIRE(got_bf.size() == bf_want.size());
  for (std::size_t i = 0; i < h_want.size(); ++i) {
    INFO("F16 element " << i);
    CHECK(bits(got_h[i]) == bits(h_want[i]));
  }
  for (std::size_t i = 0; i < bf_want.size(); ++i) {
    INFO("BF16 element " << i);
    CHECK(bits(got_bf[i]) == bits(bf_want[i]));
  }
  CHECK(f.read_matrix("half", 2, 4)(1, 3) == INFINITY);
  // F16 NaN stays NaN.
  const auto nan = io::safetensors_file::from_buffer(st_bytes(R"({"n":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}})", raw(std::vector<std::uint16_t>{0x7e00})), "nan");
  CHECK(std::isnan(nan.read("n")[0]));
}

TEST_CASE("safetensors: a sharded checkpoint reads every tensor through its index") {
  temp_dir dir;
  const std::vector<float> a{1, 2, 3, 4}, b{5, 6}, c{7, 8, 9};
  io::write_safetensors(dir / "model-00001-of-00002.safetensors", {{"a", {2, 2}, a.data()}, {"b", {2}, b.data()}});
  io::write_safetensors(dir / "model-00002-of-00002.safetensors", {{"c", {3}, c.data()}});
  const nlohmann::json index = {{"metadata", {{"total_size", 36}}},
                                {"weight_map",
                                 {{"a", "model-00001-of-00002.safetensors"},
                                  {"b", "model-00001-of-00002.safetensors"},
                                  {"c", "model-00002-of-00002.safetensors"}}}};
  put_text(dir / "model.safetensors.index.json", index.dump(2));

  for (const auto& path : {dir / "model.safetensors.index.json", dir.path().string()}) {
    INFO(path);
    const io::safetensors_checkpoint ck(path);
    CHECK(ck.names() == std::vector<std::string>{"a", "b", "c"});
    CHECK(ck.contains("c"));
    CHECK_FALSE(ck.contains("d"));
    CHECK(ck.read("a") == a);
    CHECK(ck.read("b") == b);
    CHECK(ck.read("c") == c);
    CHECK(ck.read_matrix("a", 2, 2)(1, 0) == 3.0f);
    CHECK(ck.read_vector("c", 3)(2) == 9.0f);
    CHECK(ck.info("c").shape == std::vector<std::int64_t>{3});
    CHECK_REJECTS(ck.read("d"), format_error, Catch::Contains(path) && Catch::Contains("missing tensor 'd'"));
  }
  // A single file beside the index (a stale save): the directory no longer says which is the model.
  const std::vector<float> other{9, 8, 7, 6};
  io::write_safetensors(dir / "model.safetensors", {{"a", {2, 2}, other.data()}});
  CHECK_REJECTS(io::safetensors_checkpoint{dir.path().string()}, format_error,
                Catch::Contains(dir.path().string()) && Catch::Contains("both model.safetensors and model.safetensors.index.json"));
  CHECK(io::safetensors_checkpoint(dir / "model.safetensors.index.json").read("a") == a);  // named, each still opens
  CHECK(io::safetensors_checkpoint(dir / "model.safetensors").read("a") == other);
}

TEST_CASE("safetensors: a failed write leaves the existing file untouched and no temp file") {
  temp_dir dir;
  const auto path = dir / "model.safetensors";
  put_text(path, "precious");
  const std::vector<float> x{1, 2, 3, 4};
  const auto untouched = [&] {
    CHECK(slurp(path) == std::vector<char>{'p', 'r', 'e', 'c', 'i', 'o', 'u', 's'});
    CHECK(listing(dir) == std::vector<std::string>{"model.safetensors"});
  };

  // A view claiming elements but carrying no data. (A view only holds a
  // pointer, so data shorter than its shape cannot be detected.)
  CHECK_REJECTS(io::write_safetensors(path, {{"ok", {4}, x.data()}, {"w", {2, 2}, nullptr}}), shape_error,
                Catch::Contains(path) && Catch::Contains("tensor 'w'") && Catch::Contains("no data"));
  untouched();
  CHECK_REJECTS(io::write_safetensors(path, {{"w", {2, -2}, x.data()}}), shape_error,
                Catch::Contains(path) && Catch::Contains("tensor 'w'") && Catch::Contains("invalid shape [2, -2]"));
  untouched();
  CHECK_REJECTS(io::write_safetensors(path, {{"w", {1 << 30, 1 << 30, 1 << 30}, x.data()}}), shape_error, Catch::Contains("invalid shape"));
  untouched();
  CHECK_REJECTS(io::write_safetensors(path, {{"w", {4}, x.data()}, {"w", {4}, x.data()}}), config_error,
                Catch::Contains(path) && Catch::Contains("tensor 'w'") && Catch::Contains("name used twice"));
  untouched();
  CHECK_REJECTS(io::write_safetensors(path, {{"__metadata__", {4}, x.data()}}), config_error, Catch::Contains("invalid name"));
  CHECK_REJECTS(io::write_safetensors(path, {{"", {4}, x.data()}}), config_error, Catch::Contains("invalid name"));
  untouched();

  // The rename fails: the target is a non-empty directory. The temp file goes.
  std::filesystem::create_directory(dir / "occupied");
  put_text(dir / "occupied/keep", "keep");
  CHECK_REJECTS(io::write_safetensors(dir / "occupied", {{"w", {4}, x.data()}}), io_error,
                Catch::Contains("cannot rename") && Catch::Contains("occupied"));
  CHECK(listing(dir) == std::vector<std::string>{"model.safetensors", "occupied"});
  CHECK(slurp(dir / "occupied/keep") == std::vector<char>{'k', 'e', 'e', 'p'});
  std::filesystem::remove_all(dir / "occupied");

  // Unwritable destinations: a missing directory, a "directory" that is a file.
  CHECK_REJECTS(io::write_safetensors(dir / "no/such/dir/m.safetensors", {{"w", {4}, x.data()}}), io_error,
                Catch::Contains("cannot create") && Catch::Contains("no/such/dir/m.safetensors"));
  CHECK_REJECTS(io::write_safetensors(dir / "model.safetensors/m.safetensors", {{"w", {4}, x.data()}}), io_error,
                Catch::Contains("cannot create"));
  untouched();

  // And a successful write does replace it.
  io::write_safetensors(path, {{"w", {4}, x.data()}});
  CHECK(io::safetensors_file(path).read("w") == x);
  CHECK(listing(dir) == std::vector<std::string>{"model.safetensors"});
}

TEST_CASE("safetensors: the streaming writer accepts a tensor only when the header its end offset makes still fits the reserve") {
  temp_dir tmp;
  io::safetensors_writer w(tmp / "model.safetensors", 512);
  const std::vector<float> one(1, 1.0f), big(100000, 1.0f);
  // Fill the header to within a tensor entry of its reserve with one-element tensors (offsets of 1-3 digits)...
  int i = 0;
  for (; w.fits("t" + std::to_string(i) + std::string(40, 'x'), {1}, dtype::f32); ++i) w.add("t" + std::to_string(i), {1}, one.data());
  // ...then take the longest name that fits beside a tensor whose end has more digits than its start.
  std::string last;
  for (std::size_t length = 1; w.fits(std::string(length, 'y'), {100000}, dtype::f32); ++length) last.assign(length, 'y');
  REQUIRE_FALSE(last.empty());
  w.add(last, {100000}, big.data());
  CHECK_NOTHROW(w.finish());
  const io::safetensors_file read(tmp / "model.safetensors");
  CHECK(read.tensors().size() == std::size_t(i + 1));
}

TEST_CASE("safetensors: damaged framing is a format error naming the file") {
  temp_dir dir;
  const auto path = dir / "bad.safetensors";
  const auto open = [&](const std::vector<char>& bytes) {
    put(path, bytes);
    return io::safetensors_file(path);
  };
  const auto where = Catch::Contains("safetensors: '" + path + "'");

  CHECK_REJECTS(open({}), format_error, where && Catch::Contains("0 bytes, too short for the 8-byte header length"));
  CHECK_REJECTS(open({1, 0, 0, 0, 0, 0, 0}), format_error, where && Catch::Contains("7 bytes, too short"));
  CHECK_REJECTS(open(st_bytes("{}", {}, 100'000'001)), format_error,
                where && Catch::Contains("header length 100000001 exceeds the limit of 100000000 bytes"));
  CHECK_REJECTS(open(st_bytes("{}", {}, std::int64_t(0x7fffffffffffffff))), format_error, where && Catch::Contains("exceeds the limit"));
  CHECK_REJECTS(open(st_bytes(one_tensor, zeros(8), 1000)), format_error,
                where && Catch::Contains("truncated: header length 1000 but only"));
  CHECK_REJECTS(open(st_bytes("{}", {}, 3)), format_error, where && Catch::Contains("truncated: header length 3 but only 2 bytes follow"));
  CHECK_REJECTS(open(st_bytes("", {}, 0)), format_error, where && Catch::Contains("header is not valid JSON"));
  CHECK_REJECTS(open(st_bytes(R"({"w":{"dtype":"F32",)")), format_error, where && Catch::Contains("header is not valid JSON"));
  CHECK_REJECTS(open(st_bytes(R"({"a":1} trailing)")), format_error, where && Catch::Contains("header is not valid JSON"));
  CHECK_REJECTS(open(st_bytes("{\"\xff\":1}")), format_error, where && Catch::Contains("header is not valid JSON"));  // not UTF-8
  CHECK_REJECTS(open(st_bytes("[1,2]")), format_error, where && Catch::Contains("header must be a JSON object"));
  CHECK_REJECTS(open(st_bytes("\"str\"")), format_error, where && Catch::Contains("header must be a JSON object"));

  // Not a file at all.
  CHECK_REJECTS(io::safetensors_file(dir / "missing.safetensors"), io_error, Catch::Contains("cannot open") && Catch::Contains("missing.safetensors"));
  CHECK_REJECTS(io::safetensors_file(dir.path().string()), io_error, Catch::Contains("not a readable regular file"));

  // Padding with spaces after the JSON (what the writer does) and an empty header are valid.
  CHECK(open(st_bytes("{}      ")).tensors().empty());
  CHECK(open(st_bytes(std::string(one_tensor) + "   ", zeros(8))).read("w") == std::vector<float>{0, 0});
  // The in-memory path rejects the same way and names the buffer.
  CHECK_REJECTS(io::safetensors_file::from_buffer({'x'}, "buffer-name"), format_error,
                Catch::Contains("safetensors: 'buffer-name'") && Catch::Contains("too short"));
}

TEST_CASE("safetensors: bad header entries are format errors naming the file and tensor") {
  temp_dir dir;
  const auto path = dir / "bad.safetensors";
  const auto open = [&](const std::string& header, std::size_t data_bytes) {
    put(path, st_bytes(header, zeros(data_bytes)));
    return io::safetensors_file(path);
  };
  const auto file = Catch::Contains("safetensors: '" + path + "'");
  // (Catch2 v2 matchers hold their parts by reference: combine them in place.)

  SECTION("repeated names") {
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
                  format_error, file && Catch::Contains("tensor 'w'") && Catch::Contains("appears twice in the header"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":[1],"dtype":"F16","data_offsets":[0,4]}})", 4), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("field 'dtype' appears twice"));
  }
  SECTION("__metadata__") {
    CHECK_REJECTS(open(R"({"__metadata__":{"format":"pt","epoch":3}})", 0), format_error,
                  file && Catch::Contains("__metadata__['epoch'] must be a string"));
    CHECK_REJECTS(open(R"({"__metadata__":{"nested":{"a":"b"}}})", 0), format_error, file && Catch::Contains("__metadata__['nested'] must be a string"));
    CHECK_REJECTS(open(R"({"__metadata__":["pt"]})", 0), format_error, file && Catch::Contains("__metadata__ must be an object of strings"));
    CHECK(open(R"({"__metadata__":{}})", 0).metadata().empty());
  }
  SECTION("entry structure") {
    CHECK_REJECTS(open(R"({"w":5})", 0), format_error, file && Catch::Contains("tensor 'w'") && Catch::Contains("expected an object with dtype, shape and data_offsets"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":[1]}})", 0), format_error, file && Catch::Contains("tensor 'w'") && Catch::Contains("expected an object with dtype"));
    CHECK_REJECTS(open(R"({"w":{"dtype":1,"shape":[1],"data_offsets":[0,4]}})", 4), format_error, file && Catch::Contains("tensor 'w'") && Catch::Contains("dtype must be a string"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":4,"data_offsets":[0,4]}})", 4), format_error, file && Catch::Contains("tensor 'w'") && Catch::Contains("shape must be an array"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("shape entry must be a non-negative integer, got -1"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", 4), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("shape entry must be a non-negative integer, got 1.0"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", 4), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("data_offsets must be [begin, end]"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":{"b":0}}})", 4), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("data_offsets must be [begin, end]"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,"4"]}})", 4), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("data_offsets[1] must be a non-negative integer"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", 4), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("data_offsets[0] must be a non-negative integer, got -4"));
  }
  SECTION("dtypes") {
    CHECK_REJECTS(open(R"({"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("unsupported dtype F64 (expected F32, F16 or BF16)"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"I8","shape":[1],"data_offsets":[0,1]}})", 1), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("unsupported dtype I8"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"F8_E8M0","shape":[1],"data_offsets":[0,1]}})", 1), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("unsupported dtype F8_E8M0"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"XYZ","shape":[1],"data_offsets":[0,4]}})", 4), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("unknown dtype 'XYZ'"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", 4), format_error, Catch::Contains("unknown dtype 'f32'"));
  }
  SECTION("sizes") {
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})", 4), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("shape [4294967296,4294967296] overflows the element count"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,4]}})", 4), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("overflows the element count"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,4]}})", 4), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("overflows the byte size"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", 8), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("data_offsets [8, 4) end before they begin"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("data_offsets [0, 8) hold 8 bytes, but F32 [3] needs 12"));
    CHECK_REJECTS(open(R"({"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,16]}})", 16), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("hold 16 bytes, but BF16 [2, 2] needs 8"));
  }
  SECTION("layout of the data section") {
    CHECK_REJECTS(open(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), format_error,
                  file && Catch::Contains("tensor 'w'") && Catch::Contains("leave a gap after the previous tensor (expected to start at 0)"));
    CHECK_REJECTS(open(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", 12),
                  format_error, file && Catch::Contains("tensor 'b'") && Catch::Contains("data offsets [8, 12) leave a gap") && Catch::Contains("expected to start at 4"));
    CHECK_REJECTS(open(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
                  format_error, file && Catch::Contains("tensor 'b'") && Catch::Contains("data offsets [4, 12) overlap the previous tensor (expected to start at 8)"));
    CHECK_REJECTS(open(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4),
                  format_error, Catch::Contains("overlap the previous tensor"));
    CHECK_REJECTS(open(one_tensor, 4), format_error, file && Catch::Contains("tensor 'w'") && Catch::Contains("data offsets [0, 8) exceed the data (4 bytes)"));
    CHECK_REJECTS(open(one_tensor, 9), format_error,
                  file && Catch::Contains("the tensors cover 8 bytes of data but the file holds 9 (trailing bytes)"));
    CHECK_REJECTS(open("{}", 1), format_error, file && Catch::Contains("cover 0 bytes of data but the file holds 1"));
    // Entries listed out of order are fine as long as the data is contiguous.
    const auto f = open(R"({"b":{"dtype":"F16","shape":[1],"data_offsets":[4,6]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 6);
    CHECK(f.tensors().front().name == "a");
    CHECK(f.read("b") == std::vector<float>{0.0f});
  }
  SECTION("missing tensors and wrong shapes") {
    const auto f = open(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})", 24);
    CHECK(f.find("nope") == nullptr);
    CHECK_REJECTS(f.at("nope"), format_error, file && Catch::Contains("missing tensor 'nope'"));
    CHECK_REJECTS(f.read("nope"), format_error, file && Catch::Contains("missing tensor 'nope'"));
    CHECK_REJECTS(f.read_matrix("nope", 2, 3), format_error, Catch::Contains("missing tensor 'nope'"));
    CHECK_REJECTS(f.require_shape("w", {3, 2}), shape_error, file && Catch::Contains("tensor 'w'") && Catch::Contains("has shape [2, 3], expected [3, 2]"));
    CHECK_REJECTS(f.read_matrix("w", 3, 2), shape_error, file && Catch::Contains("tensor 'w'") && Catch::Contains("has shape [2, 3], expected [3, 2]"));
    CHECK_REJECTS(f.read_vector("w", 6), shape_error, file && Catch::Contains("tensor 'w'") && Catch::Contains("has shape [2, 3], expected [6]"));
    CHECK_NOTHROW(f.require_shape("w", {2, 3}));
  }
}

TEST_CASE("safetensors: a broken sharded index is an error naming the index, shard and tensor") {
  temp_dir dir;
  const std::vector<float> a{1, 2};
  io::write_safetensors(dir / "shard1.safetensors", {{"a", {2}, a.data()}});
  const auto index = dir / "model.safetensors.index.json";
  const auto idx = Catch::Contains("index '" + index + "'");

  put_text(index, R"({"weight_map":{"a":"shard1.safetensors","b":"shard2.safetensors"}})");
  CHECK_REJECTS(io::safetensors_checkpoint{index}, io_error, Catch::Contains("cannot open") && Catch::Contains(dir / "shard2.safetensors"));

  put_text(index, R"({"weight_map":{"a":"shard1.safetensors","b":"shard1.safetensors"}})");
  CHECK_REJECTS(io::safetensors_checkpoint{index}, format_error,
                idx && Catch::Contains("places tensor 'b' in '" + (dir / "shard1.safetensors") + "', which does not hold it"));

  put_text(index, R"({"weight_map":{"a":"shard1.safetensors",)");
  CHECK_REJECTS(io::safetensors_checkpoint{index}, format_error, idx && Catch::Contains("is not valid JSON"));
  put_text(index, R"({"metadata":{}})");
  CHECK_REJECTS(io::safetensors_checkpoint{index}, format_error, idx && Catch::Contains("missing object 'weight_map'"));
  put_text(index, R"({"weight_map":["a"]})");
  CHECK_REJECTS(io::safetensors_checkpoint{index}, format_error, idx && Catch::Contains("missing object 'weight_map'"));
  put_text(index, R"({"weight_map":{"a":1}})");
  CHECK_REJECTS(io::safetensors_checkpoint{index}, format_error, idx && Catch::Contains("weight_map['a'] must be a file name"));
  for (const std::string outside : {"../shard1.safetensors", "/tmp/shard1.safetensors", "sub/shard1.safetensors", "..", ""}) {
    put_text(index, R"({"weight_map":{"a":")" + outside + R"("}})");
    CHECK_REJECTS(io::safetensors_checkpoint{index}, format_error,
                  idx && Catch::Contains("weight_map['a'] = '" + outside + "' must be the name of a file beside the index"));
  }

  // A damaged shard is reported with the shard's own name.
  put(dir / "shard1.safetensors", st_bytes("{}", {}, 50));
  put_text(index, R"({"weight_map":{"a":"shard1.safetensors"}})");
  CHECK_REJECTS(io::safetensors_checkpoint{index}, format_error, Catch::Contains(dir / "shard1.safetensors") && Catch::Contains("truncated"));

  CHECK_REJECTS(io::safetensors_checkpoint{dir / "absent.index.json"}, io_error, Catch::Contains("cannot open index"));
  temp_dir empty;
  CHECK_REJECTS(io::safetensors_checkpoint{empty.path().string()}, format_error,
                Catch::Contains(empty.path().string()) && Catch::Contains("neither model.safetensors nor model.safetensors.index.json"));
}

// Two shards holding one tensor name give it two values, and the index
// settled which one silently: nlohmann kept the last of a name listed twice,
// and a copy in a shard the index does not place it in was never looked at
// (transformers loads every tensor of every shard it lists, so it would see
// both). A tensor no entry lists escaped require_all_used likewise.
TEST_CASE("safetensors: an index naming a tensor twice or not at all is refused") {
  temp_dir dir;
  const std::vector<float> one{1, 2}, two{3, 4};
  io::write_safetensors(dir / "s1.safetensors", {{"a", {2}, one.data()}, {"b", {2}, one.data()}});
  io::write_safetensors(dir / "s2.safetensors", {{"a", {2}, two.data()}});
  const auto index = dir / "model.safetensors.index.json";
  const auto idx = Catch::Contains("index '" + index + "'");

  put_text(index, R"({"weight_map":{"a":"s1.safetensors","b":"s1.safetensors","a":"s2.safetensors"}})");
  CHECK_REJECTS(io::safetensors_checkpoint{index}, format_error, idx && Catch::Contains("tensor 'a'") && Catch::Contains("twice"));

  put_text(index, R"({"weight_map":{"a":"s2.safetensors","b":"s1.safetensors"}})");
  CHECK_REJECTS(io::safetensors_checkpoint{index}, format_error,
                idx && Catch::Contains("tensor 'a'") && Catch::Contains(dir / "s1.safetensors") && Catch::Contains(dir / "s2.safetensors"));

  io::write_safetensors(dir / "s3.safetensors", {{"a", {2}, one.data()}, {"c", {2}, two.data()}});
  put_text(index, R"({"weight_map":{"a":"s3.safetensors"}})");
  CHECK_REJECTS(io::safetensors_checkpoint{index}, format_error,
                idx && Catch::Contains("tensor 'c'") && Catch::Contains(dir / "s3.safetensors"));
}

TEST_CASE("safetensors: a write the system refuses names the file and the system's reason, and loses nothing") {
  temp_dir dir;
  const std::string path = dir / "m.safetensors";
  std::ofstream(path) << "previous";
  const std::vector<float> values(std::size_t(1) << 16, 1.0f);  // 256 KiB of tensor data
  // The process may not grow a file past 64 KiB meanwhile: the write fails
  // with EFBIG (SIGXFSZ, which would end the process, ignored).
  struct rlimit limit {};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &limit) == 0);
  const struct rlimit unlimited = limit;
  limit.rlim_cur = 64 << 10;
  const auto handler = std::signal(SIGXFSZ, SIG_IGN);
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &limit) == 0);
  std::string message;
  try {
    io::write_safetensors(path, {{"w", {std::int64_t(values.size())}, values.data()}});
  } catch (const io_error& e) {
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &unlimited);
  std::signal(SIGXFSZ, handler);
  CHECK_THAT(message, Catch::Contains("cannot write '" + path + ".tmp.") && Catch::EndsWith(std::strerror(EFBIG)));
  CHECK(file_bytes(path) == "previous");
  CHECK(std::distance(std::filesystem::directory_iterator(dir.path()), {}) == 1);
}
