// One entry point for every model file moeforge reads, chosen by the path.
#pragma once

#include <filesystem>
#include <string>

#include "moeforge/io/llama2c.hpp"
#include "moeforge/io/native.hpp"

namespace moeforge::io {

struct load_options {
  std::string config;  ///< config.json for a bare .safetensors file
};

/// Loads a llama2.c `.bin` checkpoint. Other formats (a Hugging Face
/// directory, a .safetensors file, a moeforge native directory) are named in
/// the error until their loaders land.
inline model::weights load_model(const std::string& path, const load_options& = {}) {
  namespace fs = std::filesystem;
  if (!fs::exists(path)) throw io_error(detail::cat("model '", path, "' does not exist"));
  if (fs::is_regular_file(path) && fs::path(path).extension() == ".bin") return load_llama2c(path);
  if (fs::is_directory(path) && is_native_dir(path)) return load_native(path);
  throw format_error(detail::cat("model '", path, "': expected a llama2.c .bin checkpoint (safetensors, Hugging Face and native directories are not supported by this build yet)"));
}

}  // namespace moeforge::io
