// Small helpers the model-format tests share: run a model, read and write files.
#pragma once

#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/model/transformer.hpp"

namespace moeforge::test {

/// Logits at every position of `tokens`, from an empty cache.
inline matrix logits(const model::transformer& tr, const std::vector<std::int32_t>& tokens) {
  auto cache = tr.new_cache();
  return tr.forward(tokens, cache);
}
inline matrix logits(const model::weights& w, const std::vector<std::int32_t>& tokens) { return logits(model::transformer(w), tokens); }

inline std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

inline nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

inline void write_json(const std::string& path, const nlohmann::json& j) { std::ofstream(path) << j.dump(2); }

}  // namespace moeforge::test
