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
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/core/memory.hpp"
#include "moeforge/core/tensor.hpp"
#include "moeforge/detail/json_text.hpp"
#include "moeforge/detail/temporaries.hpp"

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
    // Non-blocking: opening a FIFO would wait for a writer (it is refused below); a regular file's reads ignore it.
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
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
  /// Drops this process's resident copy of the mapped pages; they stay in the
  /// page cache and fault back in if touched again. Streaming conversion calls
  /// it after each layer, so its memory does not grow with the model's depth.
  void release() const {
    if (mapping_) ::madvise(mapping_, size_, MADV_DONTNEED);
  }

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
    throw format_error(cat("safetensors: '", file, "': header is not valid JSON (", moeforge::detail::reason(e), ")"));
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

  void release() const { bytes_->release(); }

  /// A tensor's stored bytes in place, valid while storage() lives.
  const char* stored_bytes(const std::string& name) const { return data_ + at(name).begin; }
  /// What keeps stored_bytes() valid (the file's mapping).
  std::shared_ptr<const void> storage() const { return bytes_; }

  /// The tensor's elements as float, whatever its stored dtype.
  std::vector<float> read(const std::string& name) const {
    std::vector<float> out(static_cast<std::size_t>(at(name).numel()));
    read_rows(name, 0, out.size(), out.data());
    return out;
  }

  /// Elements [first, first + count) of the tensor (flat, row-major) as float
  /// into `out`: a few rows of an embedding without touching the rest.
  void read_rows(const std::string& name, std::size_t first, std::size_t count, float* out) const {
    const auto& t = at(name);
    if (first + count > std::size_t(t.numel()))
      throw shape_error(detail::cat("safetensors: '", path_, "': tensor '", name, "': elements [", first, ", ", first + count,
                                    ") exceed its ", t.numel()));
    const std::size_t size = dtype_size(t.dtype);
    const char* p = data_ + t.begin + first * size;
    // Big tensors in blocks across the team: loading a model reads gigabytes.
    constexpr std::ptrdiff_t block = 1 << 16;
    const std::ptrdiff_t blocks = std::ptrdiff_t((count + block - 1) / block);
#pragma omp parallel for schedule(static) if (blocks > 4)
    for (std::ptrdiff_t b = 0; b < blocks; ++b) {
      const std::size_t i0 = std::size_t(b * block), i1 = std::min(count, i0 + std::size_t(block));
      widen_to_f32(p + size * i0, t.dtype, i1 - i0, out + i0);
    }
  }

  /// The tensor as a rows × cols matrix, in storage from `pool` when given.
  matrix read_matrix(const std::string& name, index_t rows, index_t cols, moeforge::detail::matrix_pool* pool = nullptr) const {
    require_shape(name, {rows, cols});
    matrix m = moeforge::detail::new_matrix(pool, rows, cols);
    read_rows(name, 0, std::size_t(m.size()), m.data());
    return m;
  }
  vector read_vector(const std::string& name, index_t n) const {
    require_shape(name, {n});
    vector v(n);
    read_rows(name, 0, std::size_t(n), v.data());
    return v;
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
      const bool index = fs::exists(p / "model.safetensors.index.json"), single = fs::exists(p / "model.safetensors");
      // Both: a stale leftover of one save beside another's, and which holds
      // the model is unknown (transformers would read the single file).
      if (index && single)
        throw format_error(cat("safetensors: directory '", path,
                               "' has both model.safetensors and model.safetensors.index.json; remove the one that is not the model"));
      if (!index && !single)
        throw format_error(cat("safetensors: directory '", path, "' has neither model.safetensors nor model.safetensors.index.json"));
      p /= index ? "model.safetensors.index.json" : "model.safetensors";
    }
    if (p.extension() == ".json")
      open_index(p);
    else
      add_shard(p.string());
  }

  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const tensor_info& info(const std::string& name) const { return file_of(name).at(name); }
  std::vector<float> read(const std::string& name) const { return file_of(name).read(name); }
  matrix read_matrix(const std::string& name, index_t rows, index_t cols, moeforge::detail::matrix_pool* pool = nullptr) const {
    return file_of(name).read_matrix(name, rows, cols, pool);
  }
  vector read_vector(const std::string& name, index_t n) const { return file_of(name).read_vector(name, n); }
  void require_shape(const std::string& name, const std::vector<std::int64_t>& expected) const { file_of(name).require_shape(name, expected); }
  void read_rows(const std::string& name, std::size_t first, std::size_t count, float* out) const {
    file_of(name).read_rows(name, first, count, out);
  }
  const char* stored_bytes(const std::string& name) const { return file_of(name).stored_bytes(name); }
  std::shared_ptr<const void> storage(const std::string& name) const { return file_of(name).storage(); }
  /// The file holding a tensor (for messages).
  const std::string& file(const std::string& name) const { return file_of(name).path(); }
  /// See detail::byte_source::release: every shard's mapped pages.
  void release() const {
    for (const auto& s : shards_) s.release();
  }
  const std::vector<safetensors_file>& shards() const { return shards_; }
  /// The type every matrix is stored in (F32 when they differ or there are
  /// none): what a model read from here is saved in again. A matrix is a
  /// tensor of two or more dimensions: packed experts ([E, 2I, H]) are E of them.
  io::dtype matrix_dtype() const {
    std::optional<io::dtype> common;
    for (const auto& f : shards_)
      for (const auto& t : f.tensors())
        if (t.shape.size() >= 2) {
          if (common && *common != t.dtype) return dtype::f32;
          common = t.dtype;
        }
    return common.value_or(dtype::f32);
  }
  /// BF16 when every matrix is stored in BF16, else F32: the weight type a
  /// model read from here keeps by default (F16 is widened).
  io::dtype weight_dtype() const { return matrix_dtype() == dtype::bf16 ? dtype::bf16 : dtype::f32; }
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
    // nlohmann keeps the last of a repeated key: a tensor listed twice is caught while parsing.
    std::string section, listed_twice;
    std::set<std::string> listed;
    auto on_event = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
      if (event != nlohmann::json::parse_event_t::key) return true;
      const auto& key = parsed.get_ref<const std::string&>();
      if (depth == 1) section = key;
      if (depth == 2 && section == "weight_map" && !listed.insert(key).second && listed_twice.empty()) listed_twice = key;
      return true;
    };
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>(), on_event);
    } catch (const nlohmann::json::exception& e) {
      throw format_error(cat("safetensors: index '", index.string(), "' is not valid JSON (", moeforge::detail::reason(e), ")"));
    }
    if (!listed_twice.empty())
      throw format_error(cat("safetensors: index '", index.string(), "': weight_map lists tensor '", listed_twice, "' twice"));
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
    // Every tensor of a listed shard must be listed there: transformers loads
    // all of a shard, so a copy elsewhere or an unlisted tensor is read too.
    for (std::size_t i = 0; i < shards_.size(); ++i)
      for (const auto& t : shards_[i].tensors()) {
        const auto it = where_.find(t.name);
        if (it == where_.end())
          throw format_error(cat("safetensors: index '", index.string(), "': tensor '", t.name, "' of '", shards_[i].path(),
                                 "' is not in its weight_map"));
        if (it->second != i)
          throw format_error(cat("safetensors: index '", index.string(), "' places tensor '", t.name, "' in '", shards_[it->second].path(),
                                 "', but '", shards_[i].path(), "' holds it too"));
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
  dtype stored = dtype::f32;  ///< the type written (F16 and BF16 rounded to nearest even)
};

namespace detail {

/// The safetensors header of `tensors` as JSON text (unpadded).
inline std::string header_text(const std::vector<tensor_info>& tensors, const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  for (const auto& t : tensors)
    header[t.name] = {{"dtype", std::string(dtype_name(t.dtype))}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
  return moeforge::detail::json_text(header);
}

/// Refuses a tensor no safetensors file can hold; returns its element count.
inline std::uint64_t checked_numel(const std::string& file, const std::string& name, const std::vector<std::int64_t>& shape, bool has_data,
                                   bool name_taken) {
  const std::string where = cat("safetensors: writing '", file, "': tensor '", name, "'");
  if (name.empty() || name == "__metadata__") throw config_error(where + ": invalid name");
  if (name_taken) throw config_error(where + ": name used twice");
  std::uint64_t numel = 1;
  for (auto d : shape)
    if (d < 0 || __builtin_mul_overflow(numel, std::uint64_t(d), &numel) || numel > (std::uint64_t(1) << 60))
      throw shape_error(cat(where, ": invalid shape ", shape_text(shape)));
  if (numel > 0 && !has_data) throw shape_error(where + ": no data");
  return numel;
}

/// Gives `tensors` (name, dtype and shape set) consecutive data offsets in
/// order, refusing bad names, repeated names and bad shapes.
inline void assign_offsets(const std::string& file, std::vector<tensor_info>& tensors) {
  std::set<std::string> names;
  std::size_t offset = 0;
  for (auto& t : tensors) {
    const std::uint64_t numel = checked_numel(file, t.name, t.shape, true, !names.insert(t.name).second);
    t.begin = offset;
    t.end = offset += std::size_t(numel * dtype_size(t.dtype));
  }
}

}  // namespace detail

/// Writes one safetensors file tensor by tensor, so a model bigger than
/// memory can be written while it is produced. The header comes first in the
/// file but is known only at the end: the writer keeps `header_reserve` bytes
/// for it and pads the JSON with spaces to fill them (the format allows
/// trailing whitespace). It writes `path` itself: callers that need
/// atomicity write into a temporary file or a staging directory.
class safetensors_writer {
 public:
  safetensors_writer(std::string path, std::size_t header_reserve, std::map<std::string, std::string> metadata = {{"format", "pt"}})
      : path_(std::move(path)), reserve_((header_reserve + 7) / 8 * 8), metadata_(std::move(metadata)) {
    open(O_CREAT | O_TRUNC);
  }

  /// Continues a file an earlier writer left unfinished (a killed run):
  /// `tensors` are the ones it had written, whose bytes are kept; anything
  /// after them is cut off.
  static safetensors_writer resume(std::string path, std::size_t header_reserve, std::vector<tensor_info> tensors,
                                   std::map<std::string, std::string> metadata = {{"format", "pt"}}) {
    safetensors_writer w(std::move(path), header_reserve, std::move(metadata), 0);
    w.open(0);
    w.tensors_ = std::move(tensors);
    for (const auto& t : w.tensors_) w.data_bytes_ = std::max<std::uint64_t>(w.data_bytes_, t.end);
    const off_t end = off_t(8 + w.reserve_ + w.data_bytes_);
    struct stat st {};
    if (::fstat(w.fd_, &st) != 0 || st.st_size < end)
      throw format_error(detail::cat("safetensors: cannot resume '", w.path_, "': it is shorter than the ", w.data_bytes_,
                                     " bytes of tensors recorded for it"));
    if (::ftruncate(w.fd_, end) != 0 || ::lseek(w.fd_, end, SEEK_SET) != end)
      throw io_error(detail::cat("safetensors: cannot resume '", w.path_, "'"));
    return w;
  }

  safetensors_writer(safetensors_writer&& o) noexcept
      : path_(std::move(o.path_)), reserve_(o.reserve_), metadata_(std::move(o.metadata_)), tensors_(std::move(o.tensors_)),
        data_bytes_(o.data_bytes_), fd_(o.fd_) {
    o.fd_ = -1;
  }
  safetensors_writer& operator=(safetensors_writer&&) = delete;
  ~safetensors_writer() {
    if (fd_ >= 0) ::close(fd_);
  }

  const std::string& path() const { return path_; }
  const std::vector<tensor_info>& tensors() const { return tensors_; }
  std::uint64_t data_bytes() const { return data_bytes_; }
  /// Bytes the file has once finished.
  std::uint64_t file_bytes() const { return 8 + reserve_ + data_bytes_; }

  /// Whether the header still fits its reserve with one more tensor of this name and shape.
  bool fits(const std::string& name, const std::vector<std::int64_t>& shape, io::dtype stored) const {
    // The header records the tensor's end: one with more digits than its
    // start can outgrow a reserve that fitted the start.
    std::uint64_t end = std::numeric_limits<std::size_t>::max();  // a shape add() refuses: judged by the widest end
    std::uint64_t numel = 1;
    bool valid = true;
    for (const auto d : shape) valid = valid && d >= 0 && !__builtin_mul_overflow(numel, std::uint64_t(d), &numel);
    std::uint64_t bytes = 0;
    if (valid && !__builtin_mul_overflow(numel, std::uint64_t(dtype_size(stored)), &bytes) && bytes <= end - data_bytes_) end = data_bytes_ + bytes;
    auto more = tensors_;
    more.push_back({name, stored, shape, std::size_t(data_bytes_), std::size_t(end)});
    return detail::header_text(more, metadata_).size() <= reserve_;
  }

  /// Appends a tensor given as floats, stored as `stored` (F32, or BF16
  /// rounded to nearest even).
  void add(const std::string& name, const std::vector<std::int64_t>& shape, const float* data, io::dtype stored = dtype::f32) {
    if (stored == dtype::f32) return add_stored(name, shape, data, stored);
    const std::uint64_t numel = check(name, shape, data != nullptr, stored);
    std::vector<std::uint16_t> chunk(std::size_t(std::min<std::uint64_t>(numel, 1 << 20)));
    for (std::uint64_t at = 0; at < numel; at += chunk.size()) {
      const std::size_t n = std::size_t(std::min<std::uint64_t>(chunk.size(), numel - at));
      for (std::size_t i = 0; i < n; ++i) chunk[i] = stored == dtype::bf16 ? f32_to_bf16(data[at + i]) : f32_to_f16(data[at + i]);
      put(reinterpret_cast<const char*>(chunk.data()), 2 * n);
    }
    record(name, shape, stored, numel);
  }

  /// Appends a tensor whose bytes are already in the stored type.
  void add_stored(const std::string& name, const std::vector<std::int64_t>& shape, const void* bytes, io::dtype stored) {
    const std::uint64_t numel = check(name, shape, bytes != nullptr, stored);
    put(static_cast<const char*>(bytes), numel * dtype_size(stored));
    record(name, shape, stored, numel);
  }

  /// Writes the header into its reserve and closes the file.
  void finish() {
    std::string text = detail::header_text(tensors_, metadata_);
    if (text.size() > reserve_)
      throw config_error(detail::cat("safetensors: writing '", path_, "': the header needs ", text.size(), " bytes, ", reserve_, " were reserved"));
    text.resize(reserve_, ' ');
    char len[8];
    for (int i = 0; i < 8; ++i) len[i] = char((std::uint64_t(reserve_) >> (8 * i)) & 0xff);
    std::string why;
    const auto wrote = [&](ssize_t got, std::size_t wanted) {
      if (got != ssize_t(wanted)) why = failure(got);
      return why.empty();
    };
    const bool written = wrote(::pwrite(fd_, len, 8, 0), 8) && wrote(::pwrite(fd_, text.data(), text.size(), 8), text.size());
    const bool closed = ::close(fd_) == 0;
    if (!closed && why.empty()) why = std::strerror(errno);
    fd_ = -1;
    if (!written || !closed) throw io_error(detail::cat("safetensors: cannot write '", path_, "': ", why));
  }

 private:
  safetensors_writer(std::string path, std::size_t header_reserve, std::map<std::string, std::string> metadata, int)
      : path_(std::move(path)), reserve_((header_reserve + 7) / 8 * 8), metadata_(std::move(metadata)) {}

  void open(int flags) {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CLOEXEC | flags, 0644);
    if (fd_ < 0) throw io_error(detail::cat("safetensors: cannot create '", path_, "'"));
    if (flags & O_TRUNC) {
      const off_t start = off_t(8 + reserve_);
      if (::lseek(fd_, start, SEEK_SET) != start) throw io_error(detail::cat("safetensors: cannot write '", path_, "'"));
    }
  }

  std::uint64_t check(const std::string& name, const std::vector<std::int64_t>& shape, bool has_data, io::dtype stored) const {
    const bool taken = std::any_of(tensors_.begin(), tensors_.end(), [&](const tensor_info& t) { return t.name == name; });
    const std::uint64_t numel = detail::checked_numel(path_, name, shape, has_data, taken);
    if (!fits(name, shape, stored))
      throw config_error(detail::cat("safetensors: writing '", path_, "': tensor '", name, "': the header outgrows the ", reserve_,
                                     " bytes reserved for it"));
    return numel;
  }

  /// Why a write that returned `result`, not the bytes it was given, failed:
  /// the system's reason (no space, a file size limit, an I/O error), or none given.
  static std::string failure(ssize_t result) { return result < 0 ? std::strerror(errno) : "the system wrote fewer bytes than given"; }

  void put(const char* p, std::uint64_t n) {
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, std::size_t(std::min<std::uint64_t>(n, 1 << 30)));
      if (w <= 0) throw io_error(detail::cat("safetensors: cannot write '", path_, "': ", failure(w)));
      p += w;
      n -= std::uint64_t(w);
    }
  }

  void record(const std::string& name, const std::vector<std::int64_t>& shape, io::dtype stored, std::uint64_t numel) {
    const std::uint64_t bytes = numel * dtype_size(stored);
    tensors_.push_back({name, stored, shape, std::size_t(data_bytes_), std::size_t(data_bytes_ + bytes)});
    data_bytes_ += bytes;
  }

  std::string path_;
  std::size_t reserve_;
  std::map<std::string, std::string> metadata_;
  std::vector<tensor_info> tensors_;
  std::uint64_t data_bytes_ = 0;
  int fd_ = -1;
};

/// Writes `tensors` (in the given order) to `path` via a temporary file in the
/// same directory (`PATH.tmp.PID`, locked while written; those killed runs
/// left are removed first: remove_abandoned) and a rename, so a failure never
/// leaves a partial file and never touches an existing one.
inline void write_safetensors(const std::string& path, const std::vector<tensor_view>& tensors,
                              const std::map<std::string, std::string>& metadata = {{"format", "pt"}}) {
  using detail::cat;
  // The header's exact size first (which also refuses bad names and shapes
  // before any file is created).
  std::vector<tensor_info> infos;
  for (const auto& t : tensors) {
    if (!t.data) detail::checked_numel(path, t.name, t.shape, false, false);  // refuses a tensor with values but no data
    infos.push_back({t.name, t.stored, t.shape, 0, 0});
  }
  detail::assign_offsets(path, infos);
  const std::string tmp = cat(path, ".tmp.", ::getpid());
  const std::filesystem::path at(path);
  moeforge::detail::remove_abandoned(at.parent_path(), cat(at.filename().string(), ".tmp."), std::filesystem::file_type::regular);
  try {
    safetensors_writer out(tmp, detail::header_text(infos, metadata).size(), metadata);
    const moeforge::detail::held_lock lock(tmp);
    for (const auto& t : tensors) out.add(t.name, t.shape, t.data, t.stored);
    out.finish();
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
