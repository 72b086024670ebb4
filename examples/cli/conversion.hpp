// What every model-transforming subcommand (convert, sparsify, prune) shares:
// the calibration options and windows, the progress bar, and writing the
// result as a native directory with its tokenizer and provenance.
#pragma once

#include <iostream>
#include <string>

#include <nlohmann/json.hpp>

#include "model_args.hpp"
#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/io/native.hpp"
#include "progress.hpp"

namespace moeforge::cli {

/// Calibration tokens when --calib-tokens is not given.
constexpr index_t default_calib_tokens = 8192;

/// --calib, --calib-tokens, --ctx, --out, --force, --quiet, --json;
/// `tokens_default` says what --calib-tokens defaults to.
inline void add_conversion_options(args& a, const std::string& tokens_default = std::to_string(default_calib_tokens)) {
  a.required("calib", "FILE", "calibration text (encoded as one BOS-prefixed stream, like eval)");
  a.required("out", "DIR", "output directory (must not exist unless --force)");
  a.option("calib-tokens", "N", "calibration tokens (default: " + tokens_default + ")");
  a.option("ctx", "N", "calibration window length (default: the model's context)");
  a.flag("force", "replace --out if it exists (only after the new model is complete)");
  a.flag("quiet", "no progress bar");
  a.flag("json", "print the conversion report as JSON on stdout");
}

/// The calibration token windows and how they were made.
struct calibration {
  std::vector<std::vector<std::int32_t>> windows;
  nlohmann::json description;

  /// Layer l's FFN inputs for the model as given (the driver's inputs function).
  convert::ffn_inputs_fn inputs() const {
    return [this](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, windows); };
  }
};

/// The calibration windows of --calib: --calib-tokens tokens, or `tokens` when it is not given.
inline calibration load_calibration(const args& a, const model::config& shape, index_t tokens = default_calib_tokens) {
  if (a.has("calib-tokens")) tokens = a.get_int("calib-tokens", 1);
  const auto tok = model::load_tokenizer(tokenizer_path(a), shape.vocab_size);
  const index_t ctx = a.has("ctx") ? a.get_int("ctx", 1) : shape.seq_len;
  calibration c;
  c.windows = calib::calibration_windows(tok.encode(read_text_file(a.get("calib"))), ctx, tokens);
  c.description = {{"text", a.get("calib")}, {"tokens", tokens}, {"ctx", ctx}, {"windows", c.windows.size()}};
  return c;
}

inline calibration load_calibration(const args& a, const model::weights& w, index_t tokens = default_calib_tokens) {
  return load_calibration(a, w.config, tokens);
}

/// Writes `w` to --out as a native model carrying its tokenizer, every tensor
/// in the type its file stored it in, a new one in its FFN's (see
/// native_save_options::as_source), or, where the loader recorded none, in
/// `source`, the type the model was loaded from (weights::stored_dtype()
/// before the conversion): a BF16 model's conversion is BF16, an F16 one's
/// F16, as a streamed one writes it; the provenance records `step` (what
/// this command did) after the source model's own history when the source is
/// a native model.
inline void save_conversion(const args& a, const model::weights& w, dtype source, nlohmann::json step) {
  nlohmann::json provenance{{"source", a.get("model")}};
  if (io::is_native_dir(a.get("model"))) {
    const auto parent = io::read_native_manifest(a.get("model"));
    if (parent.contains("provenance")) provenance["parent"] = parent["provenance"];
  }
  provenance.update(step);
  io::native_save_options save;
  save.overwrite = a.flag_set("force");
  save.attachments.push_back({tokenizer_path(a), "tokenizer.bin"});
  save.stored = source;
  save.as_source = true;
  io::save_native(w, a.get("out"), provenance, save);
  if (a.flag_set("json")) std::cout << detail::json_text(provenance) << "\n";
}

}  // namespace moeforge::cli
