// Options every model-running subcommand shares: --model, --config,
// --tokenizer (default: tok512.bin beside the model), --threads.
#pragma once

#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include <omp.h>

#include "args.hpp"
#include "moeforge/io/load.hpp"
#include "moeforge/model/tokenizer.hpp"

namespace moeforge::cli {

/// `config_flag` names the option giving a .safetensors model its config.json
/// ("config", or another name where --config means something else).
inline void add_model_options(args& a, bool needs_tokenizer, const char* config_flag = "config") {
  a.required("model", "PATH",
             std::string("a llama2.c .bin, a .safetensors file (config.json beside it, or --") + config_flag +
                 "), a Hugging Face directory or a moeforge model directory");
  a.option(config_flag, "FILE", "config.json of a .safetensors model (default: the one beside it)");
  a.option("tokenizer", "FILE", needs_tokenizer ? "llama2.c tokenizer (default: tokenizer.bin in a model directory, else tok512.bin beside the model)" : "unused here");
  a.option("threads", "N", "OpenMP threads (default: all cores)");
}

inline model::weights load_model(const args& a, const char* config_flag = "config") {
  if (a.has("threads")) omp_set_num_threads(int(a.get_int("threads", 1)));
  io::load_options o;
  if (a.has(config_flag)) o.config = a.get(config_flag);
  return io::load_model(a.get("model"), o);
}

/// --dtype for the commands that run a model: the type its weights are kept
/// in for the kernels.
inline void add_dtype_option(args& a) {
  a.option("dtype", "auto|f32|bf16", "weight type the kernels read: auto = the type the file stores (BF16 halves the bytes per token)", "auto");
}

/// The weight type --dtype asks for; empty for `auto` (the type the model's file stores).
inline std::optional<dtype> requested_dtype(const args& a) {
  if (a.get("dtype") == "auto") return std::nullopt;
  return a.get_parsed("dtype", [](const std::string& v) { return parse_weight_dtype(v); });
}

/// --tokenizer, else the tokenizer a converted model directory carries, else tok512.bin beside the model.
inline std::string tokenizer_path(const args& a) {
  namespace fs = std::filesystem;
  if (a.has("tokenizer")) return a.get("tokenizer");
  const fs::path model(a.get("model"));
  if (!fs::is_directory(model)) return (model.parent_path() / "tok512.bin").string();
  if (fs::exists(model / "tokenizer.bin")) return (model / "tokenizer.bin").string();
  return (model / "tok512.bin").string();
}

inline model::tokenizer load_tokenizer(const args& a, const model::weights& w) {
  return model::load_tokenizer(tokenizer_path(a), w.config.vocab_size);
}

inline std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io_error("cannot open text file '" + path + "'");
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace moeforge::cli
