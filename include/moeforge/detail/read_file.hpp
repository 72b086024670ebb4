// Reading whole files and little-endian scalars with bounds checks that name
// the file and the offset.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "moeforge/core/tensor.hpp"

namespace moeforge::detail {

/// The type of the file `path` names, symlinks followed (file_type::not_found
/// when there is none). Throws io_error naming `what` and the path when the
/// file system cannot tell: a symlink loop, a name too long, no permission.
inline std::filesystem::file_type file_type_of(const std::string& path, const std::string& what) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (status.type() == std::filesystem::file_type::not_found) return status.type();
  if (ec) throw io_error(cat(what, ": '", path, "': ", ec.message()));
  return status.type();
}

inline std::vector<char> read_whole_file(const std::string& path, const std::string& what) {
  // A directory opens as a stream on Linux, and then fails its reads or its
  // size; opening a FIFO waits for a writer, maybe forever.
  const auto type = file_type_of(path, what);
  if (type == std::filesystem::file_type::directory) throw io_error(cat(what, ": '", path, "' is a directory, expected a file"));
  if (type != std::filesystem::file_type::not_found && type != std::filesystem::file_type::regular)
    throw io_error(cat(what, ": '", path, "' is not a regular file"));
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw io_error(cat(what, ": cannot open '", path, "'"));
  const std::streamoff size = in.tellg();
  if (size < 0) throw io_error(cat(what, ": cannot tell the size of '", path, "' (not a regular file?)"));
  std::vector<char> bytes(static_cast<std::size_t>(size));
  in.seekg(0);
  if (size > 0 && !in.read(bytes.data(), size)) throw io_error(cat(what, ": cannot read '", path, "'"));
  return bytes;
}

/// A forward reader over a byte buffer; every read checks the remaining size.
class byte_reader {
 public:
  byte_reader(const char* data, std::size_t size, std::string what) : data_(data), size_(size), what_(std::move(what)) {}

  template <class T>
  T scalar(const char* field) {
    T v;
    take(&v, sizeof(T), field);
    return v;
  }
  void floats(float* out, std::size_t count, const char* field) { take(out, count * sizeof(float), field); }
  void bytes(char* out, std::size_t count, const char* field) { take(out, count, field); }
  void skip(std::size_t count, const char* field) { take(nullptr, count, field); }
  void fill_matrix(matrix& m, index_t rows, index_t cols, const char* field) {
    m.resize(rows, cols);
    floats(m.data(), std::size_t(rows * cols), field);
  }
  void fill_vector(vector& v, index_t n, const char* field) {
    v.resize(n);
    floats(v.data(), std::size_t(n), field);
  }
  std::size_t offset() const { return at_; }
  std::size_t remaining() const { return size_ - at_; }

 private:
  void take(void* out, std::size_t n, const char* field) {
    if (n > size_ - at_)
      throw format_error(cat(what_, ": truncated at byte ", at_, " reading ", field, " (", n, " bytes needed, ", size_ - at_, " left)"));
    if (out) std::memcpy(out, data_ + at_, n);
    at_ += n;
  }
  const char* data_;
  std::size_t size_;
  std::size_t at_ = 0;
  std::string what_;
};

}  // namespace moeforge::detail
