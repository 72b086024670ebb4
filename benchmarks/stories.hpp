// The real model the quality benchmarks run on: stories260K, its tokenizer,
// calibration windows from tinystories_calib.txt, the evaluation stream of
// tinystories_eval.txt, and in-process CMoE conversions of it.
#pragma once

#include <fstream>
#include <iterator>
#include <limits>
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

/// The counts add_stories_options adds, each checked (a count at least 1,
/// --eval-windows at least 0) before anything is loaded.
struct stories_counts {
  index_t calib_tokens, eval_windows, decode_steps;
};
inline stories_counts read_stories_counts(const cli::args& a) {
  return {index_t(a.get_int("calib-tokens", 1)), index_t(a.get_int("eval-windows", 0)), index_t(a.get_int("decode-steps", 1))};
}

/// A list option of CMoE configurations of stories260K, each parsed and
/// checked for what no FFN could take (S >= E, A outside 1..E-S) before the
/// model is loaded; its width (172 neurons) is checked by each conversion.
inline std::vector<std::string> cmoe_config_list(const cli::args& a, const std::string& name) {
  return a.get_list(
      name,
      [](const std::string& text) {
        convert::validate(convert::parse_cmoe_config(text), std::numeric_limits<index_t>::max());
        return text;
      },
      "S{shared}A{active}E{experts}, e.g. S1A3E8");
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
