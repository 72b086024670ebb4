// Streaming conversion: a Hugging Face checkpoint bigger than memory,
// converted one layer at a time into a sharded native directory.
//
// Only the calibration hidden states (tokens × H, per window) and one layer's
// weights (FP32) are resident: the shards are memory-mapped, the embedding is
// read for the calibration tokens only, and each layer is read, run through
// its attention to get its FFN inputs, converted by the method (the driver's
// per-layer conversion, on the layer presented as a one-layer model), run
// forward with its new FFN to give the next layer its inputs, written, and
// freed. Layer l is calibrated on the output of the converted layers 0..l-1,
// as convert::cmoe_model does in memory, with bit-identical arithmetic; the
// layer's tensors are then written in the source's dtype (BF16 stays BF16).
//
// The output is built in a hidden sibling directory `.NAME.partial` which
// records the finished layers (progress.json: a fingerprint of the model, the
// method's options and the calibration tokens; the shard writer's state; the
// hidden states after the last finished layer). A run that dies leaves it
// behind; `resume` continues after the last finished layer and refuses a
// different model, options or calibration. The directory is renamed to the
// output only when complete. Tensors keep the source's dtype (BF16 in, BF16
// out, rounded to nearest even; the computation is FP32).
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/convert/cmoe.hpp"
#include "moeforge/convert/driver.hpp"
#include "moeforge/io/hf.hpp"
#include "moeforge/io/native.hpp"
#include "moeforge/model/transformer.hpp"

namespace moeforge::convert {

struct stream_options {
  std::uint64_t shard_bytes = std::uint64_t(4) << 30;  ///< at most this many bytes per output shard
  bool resume = false;     ///< continue an interrupted conversion into the same output
  bool overwrite = false;  ///< replace an existing output (only once the new one is complete)
  progress_fn progress;    ///< per layer: "read", "attention", the method's stages, "forward", "write", "done"
  nlohmann::json provenance = nlohmann::json::object();  ///< recorded in moeforge.json
  std::vector<std::pair<std::string, std::string>> attachments;  ///< files copied into the output (source, name)
  /// Test hook: return once this many layers are finished, leaving the
  /// partial directory as a kill would (-1: run to the end).
  index_t stop_after_layers = -1;
};

/// Seconds this run spent per stage, summed over its layers.
struct stream_times {
  double read = 0;       ///< reading a layer from the maps (and the output's global tensors)
  double attention = 0;  ///< the calibration tokens through the layer's attention: its FFN inputs
  double convert = 0;    ///< the method
  double forward = 0;    ///< the converted FFN on the calibration tokens: the next layer's inputs
  double write = 0;      ///< the layer's tensors to the output shards, the checkpoint of progress
};

struct stream_report {
  std::vector<nlohmann::json> layers;  ///< each layer's report from the method (null where it left the layer alone)
  index_t resumed_at = 0;              ///< layers an interrupted run had finished
  bool complete = false;               ///< false when stopped by stop_after_layers
  stream_times times;
  double seconds = 0;
};

inline nlohmann::json to_json(const stream_times& t) {
  return {{"read", t.read}, {"attention", t.attention}, {"convert", t.convert}, {"forward", t.forward}, {"write", t.write}};
}

/// Converts one layer, given as a one-layer model whose FFN it may replace,
/// with the driver's inputs function and progress (layer 0 of 1); returns the
/// layer's report as JSON.
using layer_method = std::function<nlohmann::json(model::weights& layer_model, const ffn_inputs_fn& inputs, const progress_fn& progress)>;

namespace detail {

using moeforge::detail::cat;

/// FNV-1a: a fingerprint, not a defence against tampering.
inline std::uint64_t fnv1a(const void* data, std::size_t n, std::uint64_t h = 0xcbf29ce484222325ull) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}
inline std::string hex(std::uint64_t h) { return cat(std::hex, h); }

/// The model as far as resuming cares: config.json, and every shard's size
/// and tensor names, dtypes, shapes and offsets (reading the weights would
/// cost as much as converting them).
inline std::string model_fingerprint(const io::hf_layers& src) {
  std::ifstream in(src.config_path(), std::ios::binary);
  const std::string config((std::istreambuf_iterator<char>(in)), {});
  std::uint64_t h = fnv1a(config.data(), config.size());
  for (const auto& f : src.checkpoint().shards()) {
    const std::string head =
        cat(std::filesystem::path(f.path()).filename().string(), ":", std::filesystem::file_size(f.path()), ":", io::detail::header_text(f.tensors(), {}));
    h = fnv1a(head.data(), head.size(), h);
  }
  return hex(h);
}

inline std::string calibration_fingerprint(const std::vector<std::vector<std::int32_t>>& windows) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (const auto& w : windows) {
    const std::uint64_t n = w.size();
    h = fnv1a(&n, sizeof n, h);
    h = fnv1a(w.data(), w.size() * sizeof(std::int32_t), h);
  }
  return hex(h);
}

inline void write_json_atomically(const std::filesystem::path& path, const nlohmann::json& j) {
  const auto tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp);
    f << j.dump() << "\n";
    if (!f.flush()) throw io_error(cat("stream: cannot write '", tmp, "'"));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) throw io_error(cat("stream: cannot rename '", tmp, "' to '", path.string(), "': ", ec.message()));
}

inline nlohmann::json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw io_error(cat("stream: cannot open '", path.string(), "'"));
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw format_error(cat("stream: '", path.string(), "' is not valid JSON (", e.what(), ")"));
  }
}

/// The calibration hidden states of every window, stacked [tokens, H], as one
/// F32 safetensors file (F32: resuming must continue from the exact values).
inline void save_hidden(const std::filesystem::path& path, const std::vector<matrix>& x) {
  index_t rows = 0;
  for (const auto& m : x) rows += m.rows();
  matrix all(rows, x.front().cols());
  index_t at = 0;
  for (const auto& m : x) {
    all.middleRows(at, m.rows()) = m;
    at += m.rows();
  }
  io::write_safetensors(path.string(), {{"hidden", {all.rows(), all.cols()}, all.data()}});
}

inline std::vector<matrix> load_hidden(const std::filesystem::path& path, const std::vector<std::vector<std::int32_t>>& windows, index_t dim) {
  index_t rows = 0;
  for (const auto& w : windows) rows += index_t(w.size());
  const matrix all = io::safetensors_file(path.string()).read_matrix("hidden", rows, dim);
  std::vector<matrix> x;
  index_t at = 0;
  for (const auto& w : windows) {
    x.push_back(all.middleRows(at, index_t(w.size())));
    at += index_t(w.size());
  }
  return x;
}

/// A model of one layer (a placeholder one-token vocabulary, tied): what the
/// transformer and the driver run when the rest of the model is on disk.
inline model::weights layer_model(const model::config& c, model::layer l) {
  model::weights w;
  w.config = c;
  w.config.n_layers = 1;
  w.config.vocab_size = 1;
  w.config.tied_embeddings = true;
  w.tok_emb = matrix::Zero(1, c.dim);
  w.final_norm = vector::Ones(c.dim);
  w.layers.push_back(std::move(l));
  return w;
}

}  // namespace detail

/// Converts the Hugging Face checkpoint `model` (directory, index or file)
/// layer by layer with `method` into the native directory `out`. `describe`
/// is the method's options as JSON (part of the fingerprint a resume must
/// match, and of the provenance); `check` may refuse the source's config
/// before any work starts. Bad input — a missing or truncated shard, a
/// missing or misshapen tensor, an unknown dtype — is refused before anything
/// is written, with an error naming the file.
inline stream_report stream_convert(const std::string& model, const std::vector<std::vector<std::int32_t>>& windows, const std::string& out,
                                    const layer_method& method, const nlohmann::json& describe, const stream_options& opt,
                                    const std::function<void(const io::hf_config&)>& check = {}) {
  namespace fs = std::filesystem;
  using clock = std::chrono::steady_clock;
  using detail::cat;
  const auto start = clock::now();
  auto since = [](clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); };

  const fs::path out_dir = io::output_path(out);
  io::check_output_dir(out_dir.string(), opt.overwrite);
  const io::hf_layers src(model);
  const auto& c = src.config().model;
  if (check) check(src.config());
  if (windows.empty()) throw config_error("stream: no calibration tokens");
  for (std::size_t i = 0; i < windows.size(); ++i) {
    if (windows[i].empty() || index_t(windows[i].size()) > c.seq_len)
      throw config_error(cat("stream: calibration window ", i, " has ", windows[i].size(), " tokens, expected 1..", c.seq_len, " (the model's context)"));
    for (auto id : windows[i])
      if (id < 0 || id >= c.vocab_size) throw config_error(cat("stream: calibration token ", id, " is outside the vocabulary of ", c.vocab_size));
  }
  const nlohmann::json fingerprint{{"model", detail::model_fingerprint(src)},
                                   {"method", describe},
                                   {"calibration", detail::calibration_fingerprint(windows)},
                                   {"shard_bytes", opt.shard_bytes}};

  const fs::path stage = out_dir.parent_path() / cat(".", out_dir.filename().string(), ".partial");
  const fs::path progress_file = stage / "progress.json";
  stream_report rep;
  rep.layers.assign(std::size_t(c.n_layers), nullptr);
  nlohmann::json layer_manifests = nlohmann::json::array();
  std::vector<matrix> x;  // per window: the hidden states entering the next layer
  std::optional<io::native_shard_writer> writer;

  if (fs::exists(progress_file)) {
    if (!opt.resume)
      throw io_error(cat("output '", out, "': an interrupted conversion is in '", stage.string(), "'; resume it or remove that directory"));
    const auto saved = detail::read_json(progress_file);
    try {
      for (const char* part : {"model", "method", "calibration", "shard_bytes"})
        if (saved.at("fingerprint").at(part) != fingerprint.at(part))
          throw config_error(cat("cannot resume into '", out, "': the ", part, " differs from the interrupted conversion's (",
                                 std::string(part) == "method" ? cat("was ", saved["fingerprint"][part].dump(), ", now ", describe.dump())
                                                               : std::string("fingerprint ") + saved["fingerprint"][part].dump() + ", now " +
                                                                     fingerprint[part].dump(),
                                 ")"));
      rep.resumed_at = saved.at("layers_done").get<index_t>();
      layer_manifests = saved.at("manifests");
      for (index_t l = 0; l < rep.resumed_at; ++l) rep.layers[std::size_t(l)] = saved.at("reports").at(std::size_t(l));
      writer.emplace(io::native_shard_writer::resume(stage, opt.shard_bytes, saved.at("shards")));
      x = detail::load_hidden(stage / saved.at("hidden").get<std::string>(), windows, c.dim);
    } catch (const nlohmann::json::exception& e) {
      throw format_error(cat("stream: '", progress_file.string(), "' is damaged (", e.what(), ")"));
    }
  } else {
    std::error_code ec;
    fs::remove_all(stage, ec);  // a partial directory that never recorded progress holds nothing to keep
    fs::create_directories(stage, ec);
    if (ec) throw io_error(cat("stream: cannot create '", stage.string(), "': ", ec.message()));
    const auto t0 = clock::now();
    writer.emplace(stage, opt.shard_bytes);
    // The tensors outside the layers first, each read whole once (the embedding in FP32 is the largest single tensor).
    const auto& ck = src.checkpoint();
    auto global = [&](const std::string& native, const std::string& hf, std::vector<std::int64_t> shape) {
      const auto v = ck.read(hf);
      writer->add(native, shape, v.data(), src.stored(hf));
    };
    global("tok_emb", "model.embed_tokens.weight", {c.vocab_size, c.dim});
    global("final_norm", "model.norm.weight", {c.dim});
    if (!c.tied_embeddings) global("lm_head", "lm_head.weight", {c.vocab_size, c.dim});
    for (const auto& w : windows) x.push_back(src.embed(w));
    src.release();
    rep.times.read += since(t0);
  }

  auto checkpoint = [&](index_t done) {
    const std::string hidden = cat("hidden-", done, ".safetensors");
    detail::save_hidden(stage / hidden, x);
    nlohmann::json reports = nlohmann::json::array();
    for (index_t l = 0; l < done; ++l) reports.push_back(rep.layers[std::size_t(l)]);
    detail::write_json_atomically(progress_file, {{"fingerprint", fingerprint},
                                                  {"layers_done", done},
                                                  {"manifests", layer_manifests},
                                                  {"reports", reports},
                                                  {"shards", writer->state()},
                                                  {"hidden", hidden}});
    std::error_code ec;
    if (done > 0) fs::remove(stage / cat("hidden-", done - 1, ".safetensors"), ec);
  };
  if (rep.resumed_at == 0) checkpoint(0);

  const index_t layers = c.n_layers;
  auto tell = [&](index_t l, const std::string& stage_name) {
    if (opt.progress) opt.progress(layer_progress{l, layers, stage_name, since(start)});
  };
  for (index_t l = rep.resumed_at; l < layers; ++l) {
    if (opt.stop_after_layers >= 0 && l >= opt.stop_after_layers) {
      rep.seconds = since(start);
      return rep;
    }
    auto t0 = clock::now();
    tell(l, "read");
    model::weights one = detail::layer_model(c, src.layer(l));
    src.release();  // the layer is in memory now, in FP32
    const io::dtype stored = src.stored(cat("model.layers.", l, ".self_attn.q_proj.weight"));
    const model::transformer tr(one);
    rep.times.read += since(t0);

    // Attention: each window from position 0, as calib::ffn_inputs runs it.
    t0 = clock::now();
    tell(l, "attention");
    index_t total = 0;
    for (const auto& w : x) total += w.rows();
    matrix inputs(total, c.dim);
    index_t at = 0;
    for (auto& w : x) {
      model::kv_cache cache = tr.new_cache();
      tr.attention_step(0, w, cache, 0);
      model::forward_options fo;
      fo.stop_after_layer = 0;
      fo.on_ffn_input = [&](index_t, const_matrix_ref in) { inputs.middleRows(at, in.rows()) = in; };
      tr.ffn_step(0, w, fo);
      at += w.rows();
    }
    rep.times.attention += since(t0);

    t0 = clock::now();
    const ffn_inputs_fn given = [&](const model::weights&, index_t) { return inputs; };
    const progress_fn relay = [&](const layer_progress& p) {
      if (p.stage != "done") tell(l, p.stage);
    };
    rep.layers[std::size_t(l)] = method(one, given, relay);
    rep.times.convert += since(t0);

    t0 = clock::now();
    tell(l, "forward");
    for (auto& w : x) tr.ffn_step(0, w, {});
    rep.times.forward += since(t0);

    t0 = clock::now();
    tell(l, "write");
    io::detail::for_each_layer_tensor(
        std::size_t(l), one.layers.front(),
        [&](const std::string& name, const matrix& m) { writer->add(name, {m.rows(), m.cols()}, m.data(), stored); },
        [&](const std::string& name, const vector& v) { writer->add(name, {v.size()}, v.data(), stored); });
    layer_manifests.push_back(io::detail::layer_json(one.layers.front()));
    one = model::weights();
    checkpoint(l + 1);
    rep.times.write += since(t0);
    tell(l, "done");
  }

  writer->finish();
  std::error_code ec;
  fs::remove(progress_file, ec);
  fs::remove(stage / cat("hidden-", layers, ".safetensors"), ec);
  nlohmann::json provenance = opt.provenance;
  provenance["source"] = model;
  provenance["layers"] = rep.layers;
  io::detail::write_manifest(stage, c, layer_manifests, provenance, opt.attachments);
  // The output may have appeared while converting: it is replaced only when allowed.
  if (!opt.overwrite && fs::exists(fs::symlink_status(out_dir)))
    throw io_error(cat("output '", out, "' appeared during the conversion; the finished model stays in '", stage.string(), "'"));
  io::detail::move_into_place(stage, out_dir);
  rep.complete = true;
  rep.seconds = since(start);
  return rep;
}

/// The options of a CMoE conversion as JSON (what a resume must match).
inline nlohmann::json describe(const cmoe_options& o) {
  return {{"config", to_string(o.config)},
          {"ka", o.ka},
          {"ka_fraction", o.ka_fraction},
          {"leftover", std::string(leftover_name(o.leftover))},
          {"method", std::string(method_name(o.method))},
          {"iterations", o.iterations},
          {"cluster_iterations", o.cluster_iterations},
          {"seed", o.seed},
          {"block", o.block},
          {"fit",
           {{"router", std::string(router_fit_name(o.fit.router))},
            {"rank", o.fit.rank},
            {"compensate", std::string(compensation_name(o.fit.compensate))},
            {"refit", std::string(refit_name(o.fit.refit))},
            {"rounds", o.fit.rounds},
            {"router_ridge", o.fit.router_ridge},
            {"refit_ridge", o.fit.refit_ridge},
            {"distill_steps", o.fit.distill_steps},
            {"distill_lr", o.fit.distill_lr},
            {"size_rule", o.fit.size_rule}}}};
}

/// CMoE on every dense layer of a Hugging Face checkpoint, streamed (see
/// stream_convert); the same result as cmoe_model on the loaded model with
/// calib::ffn_inputs over `windows`.
inline stream_report cmoe_stream(const std::string& model, const std::vector<std::vector<std::int32_t>>& windows, const std::string& out,
                                 const cmoe_options& opt, const stream_options& so) {
  validate(opt);
  const layer_method method = [&](model::weights& w, const ffn_inputs_fn& inputs, const progress_fn& progress) -> nlohmann::json {
    const bool dense = std::holds_alternative<ffn>(w.layers.front().ffn);
    const auto reports = cmoe_model(w, inputs, opt, progress);
    return dense ? to_json(reports.front()) : nlohmann::json();
  };
  auto check = [&](const io::hf_config& h) {
    if (h.intermediate == 0)
      throw config_error(moeforge::detail::cat("cmoe: every FFN of '", model, "' is already an MoE: there is nothing to convert"));
    validate(opt.config, h.intermediate);
    resolve_ka(opt, h.intermediate);
    if (opt.fit.router == router_fit::quadratic && opt.fit.rank > h.model.dim)
      throw config_error(moeforge::detail::cat("cmoe: rank = ", opt.fit.rank, ", expected 1..", h.model.dim, " (the hidden size)"));
  };
  return stream_convert(model, windows, out, method, describe(opt), so, check);
}

}  // namespace moeforge::convert
