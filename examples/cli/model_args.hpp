// Options every model-running subcommand shares: --model, --config,
// --tokenizer (default: tok512.bin beside the model), --threads.
#pragma once

#include <filesystem>
#include <fstream>
#include <string>

#include <omp.h>

#include "args.hpp"
#include "moeforge/io/load.hpp"
#include "moeforge/model/tokenizer.hpp"

namespace moeforge::cli {

inline void add_model_options(args& a, bool needs_tokenizer) {
  a.required("model", "PATH", "a llama2.c .bin checkpoint");
  a.option("config", "FILE", "config.json for a bare .safetensors model");
  a.option("tokenizer", "FILE", needs_tokenizer ? "llama2.c tokenizer (default: tok512.bin beside the model)" : "unused here");
  a.option("threads", "N", "OpenMP threads (default: all cores)");
}

inline model::weights load_model(const args& a) {
  if (a.has("threads")) omp_set_num_threads(int(a.get_int("threads")));
  io::load_options o;
  if (a.has("config")) o.config = a.get("config");
  return io::load_model(a.get("model"), o);
}

inline model::tokenizer load_tokenizer(const args& a, const model::weights& w) {
  std::string path;
  if (a.has("tokenizer")) {
    path = a.get("tokenizer");
  } else {
    const auto model = std::filesystem::path(a.get("model"));
    path = (std::filesystem::is_directory(model) ? model : model.parent_path()) / "tok512.bin";
  }
  return model::load_tokenizer(path, w.config.vocab_size);
}

inline std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io_error("cannot open text file '" + path + "'");
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace moeforge::cli
