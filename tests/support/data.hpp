// Where tests find ../shared (models, texts, fixtures): $MOEFORGE_DATA, else
// the path configured at build time. A missing file fails the test loudly.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

#include <catch2/catch.hpp>

namespace moeforge::test {

inline std::filesystem::path data_root() {
  const char* env = std::getenv("MOEFORGE_DATA");
  return std::filesystem::path(env && *env ? env : MOEFORGE_DEFAULT_DATA);
}

/// The path of `relative` under the data root; FAILs the test if it is missing.
inline std::string data_file(const std::string& relative) {
  const auto p = data_root() / relative;
  if (!std::filesystem::exists(p))
    FAIL("missing test data: " << p.string() << " (set MOEFORGE_DATA to the folder that holds models/, data/ and fixtures/)");
  return p.string();
}

}  // namespace moeforge::test
