// JSON documents as text, whatever strings they carry.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace moeforge::detail {

/// `j` as text (indented by `indent`, or on one line). Bytes that are not
/// UTF-8 (a path on Linux may hold any) become U+FFFD instead of throwing
/// nlohmann's type_error: a manifest's provenance records the path a user
/// gave, and writing it must not fail after the model was built.
inline std::string json_text(const nlohmann::json& j, int indent = -1) {
  return j.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace moeforge::detail
