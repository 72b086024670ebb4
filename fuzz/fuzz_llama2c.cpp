// libFuzzer target: arbitrary bytes through the llama2.c checkpoint parser and
// the llama2.c tokenizer loader. The first byte chooses: even -> the rest is a
// checkpoint; odd -> the next two bytes (LE, mod 4096, + 1) are the vocabulary
// size and the rest is a tokenizer file, which is then used to encode and
// decode. A moeforge::error is the expected answer to a bad file; anything
// else (crash, sanitizer report, other exception) is a finding.
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "moeforge/io/llama2c.hpp"
#include "moeforge/model/tokenizer.hpp"

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

/// load_tokenizer only reads paths: one scratch file per fuzzing process,
/// removed when it exits normally.
const std::string& scratch_path() {
  struct scratch {
    std::string path =
        (std::filesystem::temp_directory_path() / ("moeforge-fuzz-tok-" + std::to_string(::getpid()) + ".bin")).string();
    ~scratch() {
      std::error_code ignored;
      std::filesystem::remove(path, ignored);
    }
  };
  static const scratch s;
  return s.path;
}

void fuzz_checkpoint(const char* data, std::size_t size) {
  const auto w = moeforge::io::parse_llama2c(data, size, "fuzz-input");
  const auto& c = w.config;
  check(c.dim > 0 && c.n_layers > 0 && c.vocab_size > 0 && std::size_t(c.n_layers) == w.layers.size());
  check(w.tok_emb.rows() == c.vocab_size && w.tok_emb.cols() == c.dim);
  check(c.tied_embeddings || (w.lm_head.rows() == c.vocab_size && w.lm_head.cols() == c.dim));
}

void fuzz_tokenizer(const char* data, std::size_t size) {
  if (size < 2) return;
  const moeforge::index_t vocab = ((std::uint8_t(data[0]) | std::uint8_t(data[1]) << 8) % 4096) + 1;
  {
    std::ofstream out(scratch_path(), std::ios::binary | std::ios::trunc);
    out.write(data + 2, std::streamsize(size - 2));
    check(out.good());
  }
  const auto tok = moeforge::model::load_tokenizer(scratch_path(), vocab);
  check(tok.size() == std::size_t(vocab));
  const auto ids = tok.encode("Once upon a time, \xc3\xbc\xff\xe2\x82 <0x41> x", true);
  for (auto id : ids) check(id >= 0 && std::size_t(id) < tok.size());
  (void)tok.decode(ids);
  for (std::int32_t id = 0; id < std::int32_t(tok.size()); ++id) (void)tok.decode(moeforge::model::tokenizer::bos, id);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
  if (size == 0) return 0;
  const char* data = reinterpret_cast<const char*>(bytes);
  try {
    if (bytes[0] % 2 == 0)
      fuzz_checkpoint(data + 1, size - 1);
    else
      fuzz_tokenizer(data + 1, size - 1);
  } catch (const moeforge::error&) {
  }
  return 0;
}
