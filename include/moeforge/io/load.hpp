// One entry point for every model file moeforge reads, chosen by the path.
#pragma once

#include <filesystem>
#include <string>

#include "moeforge/io/hf.hpp"
#include "moeforge/io/llama2c.hpp"
#include "moeforge/io/native.hpp"

namespace moeforge::io {

struct load_options {
  std::string config;  ///< config.json for a .safetensors file or index (default: the one beside it)
};

/// Loads any model moeforge reads, chosen by the path: a llama2.c `.bin`
/// checkpoint, a moeforge native directory, a Hugging Face directory, or a
/// `.safetensors` file / `model.safetensors.index.json` with its config.json.
inline model::weights load_model(const std::string& path, const load_options& opt = {}) {
  namespace fs = std::filesystem;
  using detail::cat;
  if (!fs::exists(path)) throw io_error(cat("model '", path, "' does not exist"));
  const fs::path p(path);
  if (fs::is_directory(p)) {
    if (is_native_dir(path)) return load_native(path);
    if (is_hf_dir(path) || !opt.config.empty()) return load_hf(path, opt.config);
    throw format_error(cat("model '", path, "': a directory with neither moeforge.json (native) nor config.json + model.safetensors (Hugging Face)"));
  }
  if (p.extension() == ".bin") {
    if (!opt.config.empty()) throw config_error(cat("model '", path, "': --config applies to safetensors models, not llama2.c checkpoints"));
    return load_llama2c(path);
  }
  if (p.extension() == ".safetensors" || p.filename() == "model.safetensors.index.json") return load_hf(path, opt.config);
  throw format_error(cat("model '", path, "': expected a llama2.c .bin, a .safetensors file, a Hugging Face or a moeforge directory"));
}

}  // namespace moeforge::io
