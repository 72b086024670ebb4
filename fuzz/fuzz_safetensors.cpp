// libFuzzer target: arbitrary bytes through the in-memory safetensors parser.
// A moeforge::error is the expected answer to a bad file; a crash, a
// sanitizer report, another exception or a broken invariant of an accepted
// file is a finding.
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "moeforge/io/safetensors.hpp"

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace moeforge;
  try {
    const auto f = io::safetensors_file::from_buffer(std::vector<char>(data, data + size), "fuzz-input");
    // An accepted file: the tensors tile the data section exactly and every
    // one reads back with its element count.
    std::size_t expected = 0;
    for (const auto& t : f.tensors()) {
      check(t.begin == expected && t.end >= t.begin);
      check(std::uint64_t(t.numel()) * dtype_size(t.dtype) == t.end - t.begin);
      expected = t.end;
      check(f.find(t.name) == &t);
      const auto v = f.read(t.name);
      check(v.size() == std::size_t(t.numel()));
      f.require_shape(t.name, t.shape);
      if (t.shape.size() == 2) (void)f.read_matrix(t.name, t.shape[0], t.shape[1]);
      if (t.shape.size() == 1) (void)f.read_vector(t.name, t.shape[0]);
    }
    check(expected + 8 <= size);
    check(f.find("__metadata__") == nullptr);
    try {
      (void)f.at("no such tensor \x01");
      std::abort();
    } catch (const format_error&) {
    }
  } catch (const moeforge::error&) {
  }
  return 0;
}
