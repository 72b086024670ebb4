// The real model the quality benchmarks run on: stories260K, its tokenizer,
// calibration windows from tinystories_calib.txt, the evaluation stream of
// tinystories_eval.txt, and in-process CMoE conversions of it.
#pragma once

#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "args.hpp"
#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/convert/cmoe.hpp"
#include "moeforge/io/llama2c.hpp"
#include "moeforge/model/eval.hpp"
#include "moeforge/model/tokenizer.hpp"

namespace moeforge::bench {

inline std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io_error("cannot open '" + path + "' (set --data or MOEFORGE_DATA to the folder holding models/ and data/)");
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

struct stories {
  model::weights dense;
  model::tokenizer tok;
  std::vector<std::vector<std::int32_t>> calib;  ///< calibration windows of 512 tokens
  std::vector<std::int32_t> eval;               ///< the evaluation text, one BOS-prefixed stream

  /// Layer l's FFN inputs on the calibration windows (the conversion driver's inputs).
  convert::ffn_inputs_fn inputs() const {
    return [this](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, calib); };
  }
};

/// The options every stories260K quality benchmark takes: --data,
/// --calib-tokens, --eval-windows, --decode-steps, --json.
inline void add_stories_options(cli::args& a) {
  a.option("data", "DIR", "the shared data directory", cli::data_root())
      .option("calib-tokens", "N", "calibration tokens", "8192")
      .option("eval-windows", "N", "evaluation windows of 512 tokens (0 = all)", "0")
      .option("decode-steps", "N", "greedy decode steps for tok/s", "256")
      .option("json", "FILE", "also write the rows as a JSON array to FILE");
}

inline stories load_stories(const std::string& root, index_t calib_tokens) {
  model::weights dense = io::load_llama2c(root + "/models/stories260K/stories260K.bin");
  model::tokenizer tok = model::load_tokenizer(root + "/models/stories260K/tok512.bin", dense.config.vocab_size);
  auto windows = calib::calibration_windows(tok.encode(read_text(root + "/data/tinystories_calib.txt")), 512, calib_tokens);
  auto eval = tok.encode(read_text(root + "/data/tinystories_eval.txt"));
  return stories{std::move(dense), std::move(tok), std::move(windows), std::move(eval)};
}

/// stories260K converted by CMoE (the CLI's defaults: K_a 10, leftovers shared).
inline model::weights cmoe_model(const stories& s, const std::string& config) {
  model::weights w = s.dense;
  convert::cmoe_options o;
  o.config = convert::parse_cmoe_config(config);
  convert::cmoe_model(w, s.inputs(), o);
  return w;
}

}  // namespace moeforge::bench
