// Prints the bits of a few forward passes, hashed, for the fp_contract test
// (tests/CMakeLists.txt): it builds this file at -O2 with GCC's default
// contraction (-ffp-contract=fast) and at -O3 with none, and their outputs
// must be equal, since the library writes every multiply-add it means to fuse
// explicitly (detail/mul_add.hpp). The passes cross RoPE of both styles,
// attention as blocked products (prefill) and row by row (decoding), the
// dense kernel in F32 and BF16 (tokens exact and rounded), and MoE layers
// with routers, shared and gated experts, novices and GELU.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "moeforge/io/llama2c.hpp"
#include "moeforge/model/transformer.hpp"

namespace moeforge::test {
model::weights fp_contract_model();  // fp_contract_model.cpp
}

namespace {

using namespace moeforge;

/// FNV-1a over the values' bits, continuing from h.
std::uint64_t hash_bits(const matrix& m, std::uint64_t h) {
  for (index_t i = 0; i < m.size(); ++i) {
    std::uint32_t u;
    std::memcpy(&u, m.data() + i, sizeof u);
    h = (h ^ u) * 1099511628211ull;
  }
  return h;
}

/// The logits of a prefill of `prompt` and of `steps` greedy decoding steps after it.
std::uint64_t run(const model::transformer& tr, const std::vector<std::int32_t>& prompt, int steps) {
  model::kv_cache cache = tr.new_cache();
  matrix logits = tr.forward(prompt, cache);
  std::uint64_t h = hash_bits(logits, 1469598103934665603ull);
  for (int s = 0; s < steps; ++s) {
    index_t best;
    logits.row(logits.rows() - 1).maxCoeff(&best);
    logits = tr.forward({std::int32_t(best)}, cache);
    h = hash_bits(logits, h);
  }
  return h;
}

std::vector<std::int32_t> tokens(index_t count, index_t vocab) {
  std::vector<std::int32_t> t;
  for (index_t i = 0; i < count; ++i) t.push_back(std::int32_t((1 + 37 * i) % vocab));
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DATA_DIR\n", argv[0]);
    return 2;
  }
  try {
    const std::string path = std::string(argv[1]) + "/models/stories260K/stories260K.bin";
    const std::vector<std::int32_t> prompt = tokens(40, 512);
    const std::pair<const char*, runtime::detail::weight_format> formats[] = {
        {"f32", dtype::f32}, {"bf16", {dtype::bf16, false}}, {"bf16-tokens", dtype::bf16}};
    for (const auto& [name, format] : formats)
      std::printf("stories260K %-11s %016llx\n", name, (unsigned long long)run(model::transformer(io::load_llama2c(path), format), prompt, 4));
    std::printf("everything  %-11s %016llx\n", "f32", (unsigned long long)run(model::transformer(test::fp_contract_model()), tokens(12, 40), 3));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fp_contract_probe: %s\n", e.what());
    return 1;
  }
}
