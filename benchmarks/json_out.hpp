// Writing a benchmark's --json rows: whole or not at all (temp file + rename),
// so an interrupted run never leaves half a file where a previous one was.
#pragma once

#include <cstdio>
#include <fstream>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

#include "args.hpp"
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

/// A benchmark's --json destination (none when the option is absent),
/// checked when the run starts: a path it cannot write fails before minutes
/// of measuring, not after them.
class json_output {
 public:
  explicit json_output(std::string path = {}) : path_(std::move(path)) {
    if (path_.empty()) return;
    const std::string tmp = path_ + ".tmp";
    if (!std::ofstream(tmp)) throw io_error("cannot write '" + tmp + "'");
    std::remove(tmp.c_str());
  }
  /// Writes `rows` whole (write_json), if there is a destination.
  void write(const nlohmann::json& rows) const {
    if (!path_.empty()) write_json(path_, rows);
  }

 private:
  std::string path_;
};

/// The destination `a`'s --json option names, if given.
inline json_output json_option(const cli::args& a) { return json_output(a.has("json") ? a.get("json") : std::string()); }

}  // namespace moeforge::bench
