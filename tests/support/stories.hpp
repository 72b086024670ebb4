// stories260K, the real model the end-to-end tests run on: loaded once per
// test binary and shared read-only (tests that modify it take a copy).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moeforge/io/llama2c.hpp"
#include "moeforge/model/tokenizer.hpp"
#include "support/data.hpp"
#include "support/util.hpp"

namespace moeforge::test {

inline const model::weights& stories_weights() {
  static const model::weights w = io::load_llama2c(data_file("models/stories260K/stories260K.bin"));
  return w;
}

inline const model::tokenizer& stories_tokenizer() {
  static const model::tokenizer t =
      model::load_tokenizer(data_file("models/stories260K/tok512.bin"), stories_weights().config.vocab_size);
  return t;
}

/// models/stories260K/reference.json: the independent reference values (a
/// float64 NumPy implementation, not moeforge) with how each was produced.
inline const nlohmann::json& stories_reference() {
  static const nlohmann::json j = read_json(data_file("models/stories260K/reference.json"));
  return j;
}

/// A text from ../shared/data encoded as `moeforge eval` does: one stream with BOS.
inline std::vector<std::int32_t> stories_text(const std::string& name) {
  return stories_tokenizer().encode(file_bytes(data_file("data/" + name)));
}

}  // namespace moeforge::test
