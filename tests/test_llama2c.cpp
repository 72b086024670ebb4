// llama2.c checkpoints and tokenizers: what loads, and the clear errors for
// files that are not what they claim.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include <sys/stat.h>

#include "moeforge/io/llama2c.hpp"
#include "moeforge/io/load.hpp"
#include "moeforge/model/tokenizer.hpp"
#include "support/data.hpp"
#include "support/temp_dir.hpp"

using namespace moeforge;
using moeforge::test::data_file;
using moeforge::test::temp_dir;

namespace {

std::vector<char> bytes_of(const std::string& path) { return moeforge::detail::read_whole_file(path, "test"); }

}  // namespace

TEST_CASE("stories260K loads with the documented configuration") {
  const auto w = io::load_llama2c(data_file("models/stories260K/stories260K.bin"));
  CHECK(w.config.dim == 64);
  CHECK(w.config.n_layers == 5);
  CHECK(w.config.n_heads == 8);
  CHECK(w.config.n_kv_heads == 4);
  CHECK(w.config.vocab_size == 512);
  CHECK(w.config.seq_len == 512);
  CHECK(w.config.tied_embeddings);
  CHECK(std::get<ffn>(w.layers[0].ffn).intermediate() == 172);
}

TEST_CASE("a truncated or inconsistent llama2.c checkpoint is a format error naming the file") {
  const auto good = bytes_of(data_file("models/stories260K/stories260K.bin"));
  SECTION("truncated") {
    CHECK_THROWS_AS(io::parse_llama2c(good.data(), good.size() - 4, "cut.bin"), format_error);
    CHECK_THROWS_WITH(io::parse_llama2c(good.data(), 20, "cut.bin"), Catch::Contains("cut.bin") && Catch::Contains("truncated"));
  }
  SECTION("files often taken for one: a llama2.c export of a later version, a PyTorch zip") {
    auto versioned = good;
    const std::uint32_t magic = 0x616b3432, version = 2;
    std::memcpy(versioned.data(), &magic, 4);
    std::memcpy(versioned.data() + 4, &version, 4);
    CHECK_THROWS_WITH(io::parse_llama2c(versioned.data(), versioned.size(), "v2.bin"),
                      Catch::Contains("v2.bin") && Catch::Contains("version 2") && Catch::Contains("--version 0"));
    auto zip = good;
    std::memcpy(zip.data(), "PK\x03\x04", 4);
    CHECK_THROWS_WITH(io::parse_llama2c(zip.data(), zip.size(), "pytorch_model.bin"), Catch::Contains("zip archive"));
  }
  SECTION("a header that does not match the size") {
    auto bad = good;
    const std::int32_t layers = 6;
    std::memcpy(bad.data() + 8, &layers, 4);
    CHECK_THROWS_WITH(io::parse_llama2c(bad.data(), bad.size(), "bad.bin"), Catch::Contains("implies"));
  }
  SECTION("nonsense header values") {
    auto bad = good;
    const std::int32_t heads = 0;
    std::memcpy(bad.data() + 12, &heads, 4);
    CHECK_THROWS_WITH(io::parse_llama2c(bad.data(), bad.size(), "bad.bin"), Catch::Contains("n_heads = 0"));
  }
  SECTION("a negative or zero dimension names its field") {
    const char* fields[] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
    for (int field = 0; field < 7; ++field) {
      // vocab_size < 0 means an untied classifier, so only 0 is bad there.
      for (std::int32_t v : {0, -1, -64}) {
        if (field == 5 && v != 0) continue;
        auto bad = good;
        std::memcpy(bad.data() + 4 * field, &v, 4);
        INFO(fields[field] << " = " << v);
        CHECK_THROWS_WITH(io::parse_llama2c(bad.data(), bad.size(), "bad.bin"),
                          Catch::Contains(std::string("header field ") + fields[field] + " = " + std::to_string(v)));
      }
    }
  }
  SECTION("dimensions that do not divide") {
    const auto with = [&](int field, std::int32_t v) {
      auto bad = good;
      std::memcpy(bad.data() + 4 * field, &v, 4);
      return bad;
    };
    auto heads = with(3, 7);  // dim 64 over 7 heads
    CHECK_THROWS_WITH(io::parse_llama2c(heads.data(), heads.size(), "bad.bin"), Catch::Contains("not a multiple of n_heads 7"));
    auto kv = with(4, 3);  // 8 heads over 3 kv heads
    CHECK_THROWS_WITH(io::parse_llama2c(kv.data(), kv.size(), "bad.bin"), Catch::Contains("not a multiple of n_kv_heads 3"));
    auto odd = with(3, 64);  // head size 1 cannot rotate in pairs
    CHECK_THROWS_WITH(io::parse_llama2c(odd.data(), odd.size(), "bad.bin"), Catch::Contains("must be even for RoPE"));
  }
  SECTION("missing file") {
    CHECK_THROWS_AS(io::load_llama2c("/nonexistent/model.bin"), io_error);
  }
}

TEST_CASE("the tokenizer round-trips text and encodes as run.c does") {
  const auto tok = model::load_tokenizer(data_file("models/stories260K/tok512.bin"), 512);
  const std::string text = "Once upon a time, Lily saw a \xe2\x80\x9c" "big\xe2\x80\x9d dog. \xc3\xa2\xe2\x82\xac\xe2\x84\xa2 Z\xc3\xbc!\n\nEnd";
  const auto ids = tok.encode(text);
  CHECK(ids.front() == model::tokenizer::bos);
  CHECK(tok.decode(ids) == text);
  // The dummy-prefix space merges with the first word, as in run.c.
  CHECK(tok.piece(ids[1]).front() == ' ');
  // Bytes with no piece of their own fall back to byte tokens (ü is not in the vocabulary).
  const auto z = tok.encode("\xc3\xbc", false);
  REQUIRE(z.size() >= 2);
  CHECK(z[z.size() - 2] == 0xc3 + model::tokenizer::byte_offset);
  CHECK(z.back() == 0xbc + model::tokenizer::byte_offset);
  CHECK(tok.encode("", true) == std::vector<std::int32_t>{1});
  // run.c's character is a byte and the continuation bytes after it (at most
  // 4 in all): a stray continuation byte falls back to bytes with the
  // character before it, whatever that character's own piece.
  const auto b = [](int byte) { return byte + model::tokenizer::byte_offset; };
  const auto stray = tok.encode("h\x80", false);
  REQUIRE(stray.size() == 3);
  CHECK(tok.piece(stray[0]) == " ");
  CHECK(stray[1] == b('h'));
  CHECK(stray[2] == b(0x80));
}

TEST_CASE("a directory given as a tokenizer or text file is an I/O error naming it") {
  const std::string dir = data_file("models/stories260K");
  CHECK_THROWS_WITH(model::load_tokenizer(dir, 512), Catch::Contains("is a directory"));
  CHECK_THROWS_AS(detail::read_whole_file(dir, "text file"), io_error);
}

TEST_CASE("a model, tokenizer or text path that is a FIFO or a symlink loop is an I/O error naming it, never a wait or an abort") {
  const temp_dir tmp;
  const std::string fifo = tmp / "fifo.bin", fifo_st = tmp / "fifo.safetensors", loop = tmp / "loop.bin";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  REQUIRE(::mkfifo(fifo_st.c_str(), 0600) == 0);
  std::filesystem::create_symlink(loop, loop);  // points at itself
  // Opening a FIFO with no writer would block: each must fail at once.
  CHECK_THROWS_WITH(io::load_model(fifo), Catch::Contains(fifo) && Catch::Contains("neither a regular file nor a directory"));
  CHECK_THROWS_AS(io::load_model(fifo_st), io_error);
  CHECK_THROWS_WITH(model::load_tokenizer(fifo, 512), Catch::Contains("not a regular file"));
  CHECK_THROWS_WITH(detail::read_whole_file(fifo, "text file"), Catch::Contains("text file") && Catch::Contains("not a regular file"));
  // A Hugging Face directory whose weights file is a FIFO: the safetensors reader opens it itself.
  const std::string hf = tmp / "hf";
  std::filesystem::create_directory(hf);
  std::filesystem::copy_file(data_file("fixtures/hf/mixtral_classic_config.json"), hf + "/config.json");
  REQUIRE(::mkfifo((hf + "/model.safetensors").c_str(), 0600) == 0);
  CHECK_THROWS_WITH(io::load_model(hf), Catch::Contains("model.safetensors") && Catch::Contains("not a readable regular file"));
  CHECK_THROWS_AS(io::load_model(loop), io_error);
  CHECK_THROWS_WITH(io::load_model(loop), Catch::Contains(loop));
  CHECK_THROWS_AS(detail::read_whole_file(loop, "text file"), io_error);
}

TEST_CASE("a tokenizer file of the wrong size is a format error") {
  const auto path = data_file("models/stories260K/tok512.bin");
  CHECK_THROWS_WITH(model::load_tokenizer(path, 500), Catch::Contains("bytes left"));
  CHECK_THROWS_WITH(model::load_tokenizer(path, 600), Catch::Contains("truncated"));
}

// Inputs the fuzzer found: each once crashed or invoked undefined behaviour.
TEST_CASE("fuzz findings: hostile llama2.c headers and tokenizers fail cleanly") {
  const auto good = bytes_of(data_file("models/stories260K/stories260K.bin"));
  SECTION("vocab_size INT32_MIN is out of range, not negated") {
    auto bad = good;
    const std::int32_t v = std::numeric_limits<std::int32_t>::min();
    std::memcpy(bad.data() + 20, &v, 4);
    CHECK_THROWS_WITH(io::parse_llama2c(bad.data(), bad.size(), "bad.bin"), Catch::Contains("vocab_size"));
  }
  SECTION("dimensions whose implied size overflows 64 bits") {
    auto bad = good;
    const std::int32_t big = 1 << 24;
    for (int field : {0, 1, 2}) std::memcpy(bad.data() + 4 * field, &big, 4);
    const std::int32_t heads = 1 << 23;  // head size 2 keeps the head checks passing
    std::memcpy(bad.data() + 12, &heads, 4);
    std::memcpy(bad.data() + 16, &heads, 4);
    CHECK_THROWS_WITH(io::parse_llama2c(bad.data(), bad.size(), "big.bin"), Catch::Contains("implies more than 2^64"));
  }
  SECTION("a tokenizer vocabulary too small for the byte fallback") {
    CHECK_THROWS_WITH(model::load_tokenizer(data_file("models/stories260K/tok512.bin"), 100), Catch::Contains("at least 259"));
  }
  SECTION("a piece like <0xZZ> decodes as text") {
    auto bytes = bytes_of(data_file("models/stories260K/tok512.bin"));
    // Token 3 is "<0x00>": damage its hex digits in place.
    const std::string needle = "<0x00>";
    auto it = std::search(bytes.begin(), bytes.end(), needle.begin(), needle.end());
    REQUIRE(it != bytes.end());
    it[3] = 'Z';
    it[4] = 'Z';
    const temp_dir dir;
    const std::string path = dir / "tok.bin";
    std::ofstream(path, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
    CHECK(model::load_tokenizer(path, 512).decode(5, 3) == "<0xZZ>");
  }
}

TEST_CASE("the tokenizer merges the leftmost of equally scored pairs first, as run.c does — aaa encodes as aa then a") {
  std::vector<std::string> pieces{"<unk>", "<s>", "</s>"};
  for (int b = 0; b < 256; ++b) {
    char hex[8];
    std::snprintf(hex, sizeof hex, "<0x%02X>", b);
    pieces.push_back(hex);
  }
  pieces.push_back("a");   // 259
  pieces.push_back("aa");  // 260
  const model::tokenizer tok(pieces, std::vector<float>(pieces.size(), 0.0f));
  CHECK(tok.encode("aaa", false) == std::vector<std::int32_t>{260, 259});
  CHECK(tok.encode("aaaaa", false) == std::vector<std::int32_t>{260, 260, 259});
}
