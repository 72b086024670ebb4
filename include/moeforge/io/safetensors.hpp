// safetensors: `[u64 LE header length N][N bytes of JSON header][data]`.
// The reader memory-maps the file and validates it as the reference
// implementation does before any tensor is touched; F16/BF16 become F32 on
// read. Sharded checkpoints go through model.safetensors.index.json. The
// writer pads the header to 8 bytes and replaces the target atomically.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/core/tensor.hpp"

namespace moeforge::io {

using moeforge::dtype;

struct tensor_info {
  std::string name;
  io::dtype dtype = dtype::f32;
  std::vector<std::int64_t> shape;
  std::size_t begin = 0, end = 0;  ///< byte offsets into the data section, end exclusive

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

namespace detail {

using moeforge::detail::cat;

/// The reference reader's limit on the header length.
inline constexpr std::uint64_t max_header_bytes = 100'000'000;

inline std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// The file's bytes: a read-only mapping, or a buffer the caller handed over.
class byte_source {
 public:
  static std::shared_ptr<const byte_source> map(const std::string& path) {
    auto s = std::shared_ptr<byte_source>(new byte_source);
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw io_error(cat("safetensors: cannot open '", path, "'"));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw io_error(cat("safetensors: '", path, "' is not a readable regular file"));
    }
    s->size_ = std::size_t(st.st_size);
    if (s->size_ > 0) {
      void* p = ::mmap(nullptr, s->size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        throw io_error(cat("safetensors: cannot map '", path, "'"));
      }
      s->mapping_ = p;
      s->data_ = static_cast<const char*>(p);
    }
    ::close(fd);
    return s;
  }
  static std::shared_ptr<const byte_source> own(std::vector<char> bytes) {
    auto s = std::shared_ptr<byte_source>(new byte_source);
    s->owned_ = std::move(bytes);
    s->data_ = s->owned_.data();
    s->size_ = s->owned_.size();
    return s;
  }
  byte_source(const byte_source&) = delete;
  byte_source& operator=(const byte_source&) = delete;
  ~byte_source() {
    if (mapping_) ::munmap(mapping_, size_);
  }
  const char* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  byte_source() = default;
  std::vector<char> owned_;
  void* mapping_ = nullptr;
  const char* data_ = nullptr;
  std::size_t size_ = 0;
};

/// Element size of a dtype name; throws for dtypes moeforge does not read,
/// distinguishing legal-but-unsupported from unknown.
inline dtype parse_dtype(const std::string& name, const std::string& where) {
  if (name == "F32") return dtype::f32;
  if (name == "F16") return dtype::f16;
  if (name == "BF16") return dtype::bf16;
  static const std::set<std::string> legal{"BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
                                             "I16", "U16", "I32", "U32", "F64", "I64", "U64", "C64"};
  if (legal.count(name)) throw format_error(cat(where, ": unsupported dtype ", name, " (expected F32, F16 or BF16)"));
  throw format_error(cat(where, ": unknown dtype '", name, "'"));
}

inline std::uint64_t json_offset(const nlohmann::json& v, const std::string& where) {
  if (!v.is_number_unsigned()) throw format_error(cat(where, " must be a non-negative integer, got ", v.dump()));
  return v.get<std::uint64_t>();
}

/// Parses the header, rejecting a repeated top-level key or a repeated field
/// of a tensor entry (the reference rejects both), which nlohmann would
/// otherwise resolve silently to its last occurrence.
inline nlohmann::json parse_header(const char* text, std::size_t n, const std::string& file) {
  std::set<std::string> keys, fields;
  std::string entry, duplicate, duplicate_field;
  auto on_event = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (event != nlohmann::json::parse_event_t::key) return true;
    const auto& key = parsed.get_ref<const std::string&>();
    if (depth == 1) {
      if (!keys.insert(key).second && duplicate.empty()) duplicate = key;
      entry = key;
      fields.clear();
    } else if (depth == 2 && entry != "__metadata__" && !fields.insert(key).second && duplicate_field.empty()) {
      duplicate_field = cat("tensor '", entry, "': field '", key, "' appears twice");
    }
    return true;
  };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text, text + n, on_event);
  } catch (const nlohmann::json::exception& e) {
    throw format_error(cat("safetensors: '", file, "': header is not valid JSON (", e.what(), ")"));
  }
  if (!duplicate.empty()) throw format_error(cat("safetensors: '", file, "': tensor '", duplicate, "' appears twice in the header"));
  if (!duplicate_field.empty()) throw format_error(cat("safetensors: '", file, "': ", duplicate_field));
  if (!header.is_object()) throw format_error(cat("safetensors: '", file, "': header must be a JSON object"));
  return header;
}

}  // namespace detail

/// One safetensors file, mapped and validated on construction.
class safetensors_file {
 public:
  explicit safetensors_file(const std::string& path) : path_(path), bytes_(detail::byte_source::map(path)) { validate(); }

  /// The same validation over bytes already in memory (`name` is used in messages).
  static safetensors_file from_buffer(std::vector<char> bytes, std::string name) {
    return safetensors_file(std::move(name), detail::byte_source::own(std::move(bytes)));
  }

  const std::string& path() const { return path_; }
  const std::vector<tensor_info>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  const tensor_info* find(const std::string& name) const {
    const auto it = by_name_.find(name);
    return it == by_name_.end() ? nullptr : &tensors_[it->second];
  }
  const tensor_info& at(const std::string& name) const {
    if (const auto* t = find(name)) return *t;
    throw format_error(detail::cat("safetensors: '", path_, "': missing tensor '", name, "'"));
  }

  /// The tensor's elements as float, whatever its stored dtype.
  std::vector<float> read(const std::string& name) const {
    const auto& t = at(name);
    std::vector<float> out(static_cast<std::size_t>(t.numel()));
    const char* p = data_ + t.begin;
    // memcpy per element: foreign files need not align tensors.
    if (t.dtype == dtype::f32) {
      if (!out.empty()) std::memcpy(out.data(), p, out.size() * 4);
      return out;
    }
    for (std::size_t i = 0; i < out.size(); ++i) {
      std::uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      out[i] = t.dtype == dtype::f16 ? f16_to_f32(h) : bf16_to_f32(h);
    }
    return out;
  }

  matrix read_matrix(const std::string& name, index_t rows, index_t cols) const {
    require_shape(name, {rows, cols});
    const auto v = read(name);
    return Eigen::Map<const matrix>(v.data(), rows, cols);
  }
  vector read_vector(const std::string& name, index_t n) const {
    require_shape(name, {n});
    const auto v = read(name);
    return Eigen::Map<const vector>(v.data(), n);
  }

  /// Throws shape_error naming the file, the tensor and both shapes.
  void require_shape(const std::string& name, const std::vector<std::int64_t>& expected) const {
    const auto& t = at(name);
    if (t.shape != expected)
      throw shape_error(detail::cat("safetensors: '", path_, "': tensor '", name, "' has shape ", detail::shape_text(t.shape),
                                    ", expected ", detail::shape_text(expected)));
  }

 private:
  safetensors_file(std::string name, std::shared_ptr<const detail::byte_source> bytes) : path_(std::move(name)), bytes_(std::move(bytes)) {
    validate();
  }

  void validate() {
    using detail::cat;
    const std::string file = cat("safetensors: '", path_, "'");
    const std::size_t size = bytes_->size();
    if (size < 8) throw format_error(cat(file, ": ", size, " bytes, too short for the 8-byte header length"));
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | std::uint8_t(bytes_->data()[i]);
    if (n > detail::max_header_bytes)
      throw format_error(cat(file, ": header length ", n, " exceeds the limit of ", detail::max_header_bytes, " bytes"));
    if (n > size - 8) throw format_error(cat(file, ": truncated: header length ", n, " but only ", size - 8, " bytes follow"));
    const auto header = detail::parse_header(bytes_->data() + 8, std::size_t(n), path_);
    data_ = bytes_->data() + 8 + n;
    const std::size_t data_size = size - 8 - std::size_t(n);

    for (const auto& [key, value] : header.items()) {
      if (key == "__metadata__") {
        if (!value.is_object()) throw format_error(cat(file, ": __metadata__ must be an object of strings"));
        for (const auto& [k, v] : value.items()) {
          if (!v.is_string()) throw format_error(cat(file, ": __metadata__['", k, "'] must be a string"));
          metadata_[k] = v.get<std::string>();
        }
        continue;
      }
      tensors_.push_back(parse_entry(key, value, file));
    }
    std::sort(tensors_.begin(), tensors_.end(), [](const tensor_info& a, const tensor_info& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    std::size_t expected = 0;
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      const auto& t = tensors_[i];
      const std::string where = cat(file, ": tensor '", t.name, "'");
      if (t.begin != expected)
        throw format_error(cat(where, ": data offsets [", t.begin, ", ", t.end, ") ", t.begin < expected ? "overlap the previous tensor" : "leave a gap after the previous tensor",
                               " (expected to start at ", expected, ")"));
      if (t.end > data_size) throw format_error(cat(where, ": data offsets [", t.begin, ", ", t.end, ") exceed the data (", data_size, " bytes)"));
      expected = t.end;
      by_name_[t.name] = i;
    }
    if (expected != data_size)
      throw format_error(cat(file, ": the tensors cover ", expected, " bytes of data but the file holds ", data_size, " (trailing bytes)"));
  }

  static tensor_info parse_entry(const std::string& name, const nlohmann::json& v, const std::string& file) {
    using detail::cat;
    const std::string where = cat(file, ": tensor '", name, "'");
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
      throw format_error(cat(where, ": expected an object with dtype, shape and data_offsets"));
    tensor_info t;
    t.name = name;
    if (!v["dtype"].is_string()) throw format_error(cat(where, ": dtype must be a string"));
    t.dtype = detail::parse_dtype(v["dtype"].get<std::string>(), where);
    if (!v["shape"].is_array()) throw format_error(cat(where, ": shape must be an array"));
    std::uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      const std::uint64_t dim = detail::json_offset(d, where + ": shape entry");
      if (dim > std::uint64_t(INT64_MAX) || __builtin_mul_overflow(numel, dim, &numel))
        throw format_error(cat(where, ": shape ", v["shape"].dump(), " overflows the element count"));
      t.shape.push_back(std::int64_t(dim));
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2) throw format_error(cat(where, ": data_offsets must be [begin, end]"));
    const std::uint64_t b = detail::json_offset(off[0], where + ": data_offsets[0]");
    const std::uint64_t e = detail::json_offset(off[1], where + ": data_offsets[1]");
    if (e < b) throw format_error(cat(where, ": data_offsets [", b, ", ", e, ") end before they begin"));
    std::uint64_t bytes = 0;
    if (__builtin_mul_overflow(numel, std::uint64_t(dtype_size(t.dtype)), &bytes))
      throw format_error(cat(where, ": shape ", v["shape"].dump(), " overflows the byte size"));
    if (e - b != bytes)
      throw format_error(cat(where, ": data_offsets [", b, ", ", e, ") hold ", e - b, " bytes, but ", dtype_name(t.dtype), " ",
                             detail::shape_text(t.shape), " needs ", bytes));
    if (b > SIZE_MAX || e > SIZE_MAX) throw format_error(cat(where, ": data offsets do not fit in memory"));
    t.begin = std::size_t(b);
    t.end = std::size_t(e);
    return t;
  }

  std::string path_;
  std::shared_ptr<const detail::byte_source> bytes_;
  const char* data_ = nullptr;
  std::vector<tensor_info> tensors_;
  std::map<std::string, std::size_t> by_name_;
  std::map<std::string, std::string> metadata_;
};

/// A checkpoint: one .safetensors file, or shards listed by
/// model.safetensors.index.json. `path` is the file, the index, or a
/// directory holding model.safetensors or model.safetensors.index.json.
class safetensors_checkpoint {
 public:
  explicit safetensors_checkpoint(const std::string& path) : path_(path) {
    namespace fs = std::filesystem;
    using detail::cat;
    fs::path p(path);
    if (fs::is_directory(p)) {
      if (fs::exists(p / "model.safetensors.index.json"))
        p /= "model.safetensors.index.json";
      else if (fs::exists(p / "model.safetensors"))
        p /= "model.safetensors";
      else
        throw format_error(cat("safetensors: directory '", path, "' has neither model.safetensors nor model.safetensors.index.json"));
    }
    if (p.extension() == ".json")
      open_index(p);
    else
      add_shard(p.string());
  }

  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const tensor_info& info(const std::string& name) const { return file_of(name).at(name); }
  std::vector<float> read(const std::string& name) const { return file_of(name).read(name); }
  matrix read_matrix(const std::string& name, index_t rows, index_t cols) const { return file_of(name).read_matrix(name, rows, cols); }
  vector read_vector(const std::string& name, index_t n) const { return file_of(name).read_vector(name, n); }
  void require_shape(const std::string& name, const std::vector<std::int64_t>& expected) const { file_of(name).require_shape(name, expected); }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [name, shard] : where_) out.push_back(name);
    return out;
  }

 private:
  void open_index(const std::filesystem::path& index) {
    using detail::cat;
    std::ifstream in(index);
    if (!in) throw io_error(cat("safetensors: cannot open index '", index.string(), "'"));
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      throw format_error(cat("safetensors: index '", index.string(), "' is not valid JSON (", e.what(), ")"));
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      throw format_error(cat("safetensors: index '", index.string(), "': missing object 'weight_map'"));
    std::map<std::string, std::size_t> shard_of_file;
    for (const auto& [tensor, file] : j["weight_map"].items()) {
      if (!file.is_string()) throw format_error(cat("safetensors: index '", index.string(), "': weight_map['", tensor, "'] must be a file name"));
      const auto f = file.get<std::string>();
      // Shards live beside their index: a path elsewhere (absolute, "../x", "d/x") is refused.
      if (f.empty() || f == "." || f == ".." || std::filesystem::path(f).has_parent_path())
        throw format_error(cat("safetensors: index '", index.string(), "': weight_map['", tensor, "'] = '", f,
                               "' must be the name of a file beside the index"));
      if (!shard_of_file.count(f)) {
        shard_of_file[f] = shards_.size();
        shards_.emplace_back((index.parent_path() / f).string());
      }
      const auto& shard = shards_[shard_of_file[f]];
      if (!shard.find(tensor))
        throw format_error(cat("safetensors: index '", index.string(), "' places tensor '", tensor, "' in '", shard.path(), "', which does not hold it"));
      where_[tensor] = shard_of_file[f];
    }
  }

  void add_shard(const std::string& file) {
    shards_.emplace_back(file);
    for (const auto& t : shards_.back().tensors()) where_[t.name] = shards_.size() - 1;
  }

  const safetensors_file& file_of(const std::string& name) const {
    const auto it = where_.find(name);
    if (it == where_.end()) throw format_error(detail::cat("safetensors: checkpoint '", path_, "': missing tensor '", name, "'"));
    return shards_[it->second];
  }

  std::string path_;
  std::vector<safetensors_file> shards_;
  std::map<std::string, std::size_t> where_;
};

/// An F32 tensor to write; `data` holds numel floats, row-major.
struct tensor_view {
  std::string name;
  std::vector<std::int64_t> shape;
  const float* data = nullptr;
};

/// Writes `tensors` (in the given order) to `path` via a temporary file in the
/// same directory and a rename, so a failure never leaves a partial file and
/// never touches an existing one.
inline void write_safetensors(const std::string& path, const std::vector<tensor_view>& tensors,
                              const std::map<std::string, std::string>& metadata = {{"format", "pt"}}) {
  using detail::cat;
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (const auto& t : tensors) {
    const std::string where = cat("safetensors: writing '", path, "': tensor '", t.name, "'");
    if (t.name.empty() || t.name == "__metadata__") throw config_error(where + ": invalid name");
    if (header.contains(t.name)) throw config_error(where + ": name used twice");
    std::uint64_t numel = 1;
    for (auto d : t.shape) {
      if (d < 0 || __builtin_mul_overflow(numel, std::uint64_t(d), &numel)) throw shape_error(cat(where, ": invalid shape ", detail::shape_text(t.shape)));
    }
    if (numel > 0 && !t.data) throw shape_error(where + ": no data");
    header[t.name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + 4 * numel}}};
    offset += 4 * numel;
  }
  std::string text = header.dump();
  text.resize((text.size() + 7) / 8 * 8, ' ');

  const std::string tmp = cat(path, ".tmp.", ::getpid());
  try {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw io_error(cat("safetensors: cannot create '", tmp, "'"));
    char len[8];
    for (int i = 0; i < 8; ++i) len[i] = char((std::uint64_t(text.size()) >> (8 * i)) & 0xff);
    out.write(len, 8);
    out.write(text.data(), std::streamsize(text.size()));
    for (const auto& t : tensors) {
      std::uint64_t numel = 1;
      for (auto d : t.shape) numel *= std::uint64_t(d);
      if (numel) out.write(reinterpret_cast<const char*>(t.data), std::streamsize(4 * numel));
    }
    out.flush();
    if (!out) throw io_error(cat("safetensors: cannot write '", tmp, "'"));
    out.close();
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) throw io_error(cat("safetensors: cannot rename '", tmp, "' to '", path, "': ", ec.message()));
  } catch (...) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw;
  }
}

}  // namespace moeforge::io
