// Writing a benchmark's --json rows: whole or not at all (temp file + rename),
// so an interrupted run never leaves half a file where a previous one was.
#pragma once

#include <cstdio>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "moeforge/core/error.hpp"

namespace moeforge::bench {

inline void write_json(const std::string& path, const nlohmann::json& rows) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    f << rows.dump(1) << "\n";
    if (!f.flush()) throw io_error("cannot write '" + tmp + "'");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw io_error("cannot rename '" + tmp + "' to '" + path + "'");
}

}  // namespace moeforge::bench
