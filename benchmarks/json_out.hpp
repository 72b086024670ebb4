// Writing a benchmark's --json rows: whole or not at all (temp file + rename),
// so an interrupted run never leaves half a file where a previous one was.
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "moeforge/core/error.hpp"

namespace moeforge::bench {

namespace detail {

/// Refuses a destination that exists but is not a regular file (a directory,
/// a device): the rename at the end would fail only after the whole run.
inline void check_json_destination(const std::string& path) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (std::filesystem::exists(status) && !std::filesystem::is_regular_file(status))
    throw io_error("cannot write '" + path + "': it exists and is not a regular file");
}

/// A new file beside `path` of a name no other file has ("PATH.tmp.XXXXXX",
/// mkstemp), open for writing: a fixed "PATH.tmp" could be a file of the
/// user's, which probing or writing would then truncate or remove.
inline std::pair<std::string, std::FILE*> create_temp_beside(const std::string& path) {
  std::string tmp = path + ".tmp.XXXXXX";
  const int fd = ::mkstemp(tmp.data());
  if (fd < 0)
    throw io_error("cannot write '" + path + "': cannot create a temporary file '" + path + ".tmp.XXXXXX' beside it: " + std::strerror(errno));
  // mkstemp makes the file private (0600); the rows get the permissions any new file of the user's would.
  const mode_t mask = ::umask(0);
  ::umask(mask);
  ::fchmod(fd, 0666 & ~mask);
  std::FILE* f = ::fdopen(fd, "w");
  if (!f) {
    ::close(fd);
    std::remove(tmp.c_str());
    throw io_error("cannot write '" + tmp + "'");
  }
  return {tmp, f};
}

}  // namespace detail

inline void write_json(const std::string& path, const nlohmann::json& rows) {
  detail::check_json_destination(path);
  const auto [tmp, f] = detail::create_temp_beside(path);
  const std::string text = rows.dump(1) + "\n";
  const bool written = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  if (std::fclose(f) != 0 || !written) {
    std::remove(tmp.c_str());
    throw io_error("cannot write '" + tmp + "'");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    throw io_error("cannot rename '" + tmp + "' to '" + path + "': " + std::strerror(e));
  }
}

/// A benchmark's --json destination (none when the option is absent),
/// checked when the run starts: a path it cannot write fails before minutes
/// of measuring, not after them.
class json_output {
 public:
  explicit json_output(std::string path = {}) : path_(std::move(path)) {
    if (path_.empty()) return;
    detail::check_json_destination(path_);
    const auto [tmp, f] = detail::create_temp_beside(path_);
    std::fclose(f);
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
