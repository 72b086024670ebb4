// Streaming conversion: a Hugging Face checkpoint bigger than memory,
// converted one layer at a time into a sharded native directory, by any
// method that has a per-layer form: CMoE on the dense layers, DualSparse-MoE
// and MoNE (layer scope) on the MoE layers.
//
// Only the calibration hidden states (tokens × H, per window) and one layer's
// weights (FP32) are resident: the shards are memory-mapped, the embedding is
// read for the calibration tokens only, and each layer is read, run through
// its attention to get its FFN inputs, converted by the method's per-layer
// function (the one its in-memory *_model runs on the driver), run forward
// with its new FFN to give the next layer its inputs, written, and freed.
// Layer l is calibrated on the output of the converted layers 0..l-1, as the
// in-memory driver does with sequential inputs, with bit-identical
// arithmetic; a method calibrated on the untouched model (MoNE's unpruned
// inputs) gets the layer's forward pass through its original FFN instead.
// Methods whose choice spans layers (DualSparse's global threshold, MoNE's
// global ranking) have no per-layer form and are refused before any work: a
// first pass over every layer would read the model twice.
//
// The output is built in a hidden sibling directory `.NAME.partial` which
// records the finished layers (progress.json: a fingerprint of the model, the
// method's options and the calibration tokens; the shard writer's state; the
// hidden states after the last finished layer, and a hash of every byte each
// finished layer and the global tensors were converted from). A run that dies
// leaves it behind; `resume` continues after the last finished layer and
// refuses a different model, method, options or calibration, and a source
// whose global tensors or finished layers changed by a single byte (it reads
// them again to check), and a second run while one is writing it. The
// directory is renamed to the output only when complete. Tensors keep the
// source's dtype (BF16 in, BF16 out, rounded to nearest even; the
// computation is FP32).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/convert/cmoe.hpp"
#include "moeforge/convert/driver.hpp"
#include "moeforge/convert/dualsparse.hpp"
#include "moeforge/convert/mone.hpp"
#include "moeforge/detail/temporaries.hpp"
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
  double forward = 0;    ///< the FFN (converted, or the original when not sequential) on the calibration tokens: the next layer's inputs
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

/// A conversion method as the streaming driver runs it.
struct stream_method {
  std::string name;  ///< "cmoe", "dualsparse", "mone": recorded in the provenance and what a resume must match
  layer_filter filter = layer_filter::dense;  ///< the layers it converts; the others are copied
  /// true: each layer calibrates on the converted layers before it; false: on
  /// the untouched model (the driver forwards the original FFN).
  bool sequential = true;
  nlohmann::json options;  ///< the method's options: what a resume must match
  /// Converts the visited layer (replacing v.ffn); returns its report.
  std::function<nlohmann::json(layer_visit& v)> convert_layer;
  /// May refuse the source's config before anything is written.
  std::function<void(const io::hf_config&)> check;
};

namespace detail {

using moeforge::detail::cat;

/// FNV-1a: a fingerprint, not a defence against tampering.
inline std::uint64_t fnv1a(const void* data, std::size_t n, std::uint64_t h = 0xcbf29ce484222325ull) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}
inline std::string hex(std::uint64_t h) { return cat(std::hex, h); }

/// A hash of n bytes at memory speed, where FNV-1a's multiply a byte runs at
/// about 1 GB/s: four independent chains over 8-byte words, then FNV-1a over
/// the chains, the length and the tail. A fingerprint, like fnv1a.
inline std::uint64_t bytes_hash(const char* p, std::size_t n, std::uint64_t h) {
  constexpr std::uint64_t odd = 0x9e3779b97f4a7c15ull;
  std::uint64_t lane[4] = {h, h + odd, h + 2 * odd, h + 3 * odd};
  std::size_t i = 0;
  for (; i + sizeof lane <= n; i += sizeof lane)
    for (int j = 0; j < 4; ++j) {
      std::uint64_t w;
      std::memcpy(&w, p + i + 8 * j, 8);
      const std::uint64_t m = (lane[j] ^ w) * odd;
      lane[j] = m << 29 | m >> 35;
    }
  h = fnv1a(lane, sizeof lane, h);
  h = fnv1a(&n, sizeof n, h);
  return fnv1a(p + i, n - i, h);
}

inline bool in_a_layer(const std::string& name) { return name.rfind("model.layers.", 0) == 0; }

/// Every byte of the source's tensors `which` selects, in name order, with their names.
template <class Which>
std::string tensors_hash(const io::hf_layers& src, Which which) {
  const auto& ck = src.checkpoint();
  std::vector<std::string> names = ck.names();
  std::sort(names.begin(), names.end());
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (const auto& name : names) {
    if (!which(name)) continue;
    const auto& t = ck.info(name);
    h = fnv1a(name.data(), name.size(), h);
    h = bytes_hash(ck.stored_bytes(name), t.end - t.begin, h);
  }
  return hex(h);
}

/// What layer l of the output was converted from: every byte of the
/// source's tensors of that layer. A resume checks it for each finished
/// layer, so an edit anywhere inside one is refused, where the model's
/// fingerprint samples only each tensor's ends.
inline std::string layer_source_hash(const io::hf_layers& src, index_t l) {
  const std::string prefix = cat("model.layers.", l, ".");
  return tensors_hash(src, [&](const std::string& name) { return name.rfind(prefix, 0) == 0; });
}

/// Every byte of the tensors outside the layers (embedding, final norm,
/// classifier), which the calibration's hidden states and the output's
/// global tensors come from.
inline std::string globals_source_hash(const io::hf_layers& src) {
  return tensors_hash(src, [](const std::string& name) { return !in_a_layer(name); });
}

/// The model's shape as far as resuming cares: config.json, every shard's
/// size and tensor names, dtypes, shapes and offsets, and the first and last
/// bytes of every tensor, a sample that tells another checkpoint of the same
/// architecture apart at once (the bytes a resume depends on are checked in
/// full: globals_source_hash, layer_source_hash).
inline std::string model_fingerprint(const io::hf_layers& src) {
  constexpr std::size_t sample = 64;
  std::ifstream in(src.config_path(), std::ios::binary);
  const std::string config((std::istreambuf_iterator<char>(in)), {});
  std::uint64_t h = fnv1a(config.data(), config.size());
  for (const auto& f : src.checkpoint().shards()) {
    const std::string head =
        cat(std::filesystem::path(f.path()).filename().string(), ":", std::filesystem::file_size(f.path()), ":", io::detail::header_text(f.tensors(), {}));
    h = fnv1a(head.data(), head.size(), h);
    for (const auto& t : f.tensors()) {
      const std::size_t bytes = t.end - t.begin, n = std::min(bytes, sample);
      h = fnv1a(f.stored_bytes(t.name), n, h);
      h = fnv1a(f.stored_bytes(t.name) + (bytes - n), n, h);
    }
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

/// Where `now` differs from `was`, one "path: was A, now B" per changed
/// value (a key one of them lacks is "absent" there), so that a refused
/// resume names the option that changed instead of printing both.
inline std::string json_differences(const nlohmann::json& was, const nlohmann::json& now) {
  std::string out;
  for (const auto& op : nlohmann::json::diff(was, now)) {
    const nlohmann::json::json_pointer at(op.at("path").get<std::string>());
    const auto value = [&](const nlohmann::json& j) { return j.contains(at) ? j.at(at).dump() : std::string("absent"); };
    out += moeforge::detail::cat(out.empty() ? "" : "; ", at.to_string().substr(1), ": was ", value(was), ", now ", value(now));
  }
  return out;
}

inline void write_json_atomically(const std::filesystem::path& path, const nlohmann::json& j) {
  const auto tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp);
    f << moeforge::detail::json_text(j) << "\n";
    if (!f.flush()) throw io_error(cat("stream: cannot write '", tmp, "'"));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) throw io_error(cat("stream: cannot rename '", tmp, "' to '", path.string(), "': ", ec.message()));
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

}  // namespace detail

/// Converts the Hugging Face checkpoint `model` (directory, index or file)
/// layer by layer with `method` into the native directory `out`. Bad input —
/// a missing or truncated shard, a missing or misshapen tensor, an unknown
/// dtype, a config the method refuses — is refused before anything is
/// written, with an error naming the file.
inline stream_report stream_convert(const std::string& model, const std::vector<std::vector<std::int32_t>>& windows, const std::string& out,
                                    const stream_method& method, const stream_options& opt) {
  namespace fs = std::filesystem;
  using clock = std::chrono::steady_clock;
  using detail::cat;
  const auto start = clock::now();
  auto since = [](clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); };

  const fs::path out_dir = io::output_path(out);
  io::check_output_dir(out_dir.string(), opt.overwrite);
  if (opt.shard_bytes < 1) throw config_error("stream: the shard size must be at least 1 byte");
  const io::hf_layers src(model);
  const auto& c = src.config().model;
  if (method.check) method.check(src.config());
  if (windows.empty()) throw config_error("stream: no calibration tokens");
  for (std::size_t i = 0; i < windows.size(); ++i) {
    if (windows[i].empty() || index_t(windows[i].size()) > c.seq_len)
      throw config_error(cat("stream: calibration window ", i, " has ", windows[i].size(), " tokens, expected 1..", c.seq_len, " (the model's context)"));
    for (auto id : windows[i])
      if (id < 0 || id >= c.vocab_size) throw config_error(cat("stream: calibration token ", id, " is outside the vocabulary of ", c.vocab_size));
  }
  // The method by name and options (two methods' options may look alike);
  // CMoE's by its options alone, as it was recorded before, so that its
  // interrupted conversions still resume.
  const nlohmann::json method_print = method.name == "cmoe" ? method.options : nlohmann::json{{"name", method.name}, {"options", method.options}};
  const nlohmann::json fingerprint{{"model", detail::model_fingerprint(src)},
                                   {"method", method_print},
                                   {"calibration", detail::calibration_fingerprint(windows)},
                                   {"shard_bytes", opt.shard_bytes}};

  const fs::path stage = out_dir.parent_path() / cat(".", out_dir.filename().string(), ".partial");
  const fs::path progress_file = stage / "progress.json";
  stream_report rep;
  rep.layers.assign(std::size_t(c.n_layers), nullptr);
  nlohmann::json layer_manifests = nlohmann::json::array();
  std::vector<matrix> x;  // per window: the hidden states entering the next layer
  std::optional<io::native_shard_writer> writer;
  nlohmann::json shards;  // the writer's state at the last checkpoint
  // What the output was converted from: the global tensors' and each finished layer's hashes.
  nlohmann::json sources{{"globals", detail::globals_source_hash(src)}, {"layers", nlohmann::json::array()}};

  // Locked while this run writes into it (see detail/temporaries.hpp): two
  // runs resuming one conversion would overwrite each other's shards.
  moeforge::detail::held_lock stage_lock;
  const auto lock_stage = [&] {
    stage_lock = moeforge::detail::held_lock(stage);
    if (stage_lock.busy()) throw io_error(cat("output '", out, "': another conversion is writing into '", stage.string(), "' now"));
  };
  if (fs::exists(stage)) lock_stage();
  if (fs::exists(progress_file)) {
    if (!opt.resume)
      throw io_error(cat("output '", out, "': an interrupted conversion is in '", stage.string(), "'; resume it or remove that directory"));
    const auto saved = io::read_json_file(progress_file.string(), "stream");
    try {
      for (const char* part : {"model", "method", "calibration", "shard_bytes"})
        if (saved.at("fingerprint").at(part) != fingerprint.at(part))
          throw config_error(cat("cannot resume into '", out, "': the ", part, " differs from the interrupted conversion's (",
                                 std::string(part) == "method" ? detail::json_differences(saved["fingerprint"][part], fingerprint[part])
                                                               : std::string("fingerprint ") + saved["fingerprint"][part].dump() + ", now " +
                                                                     fingerprint[part].dump(),
                                 ")"));
      rep.resumed_at = saved.at("layers_done").get<index_t>();
      layer_manifests = saved.at("manifests");
      const auto& reports = saved.at("reports");
      if (rep.resumed_at < 0 || rep.resumed_at > c.n_layers || !layer_manifests.is_array() || !reports.is_array() ||
          index_t(layer_manifests.size()) != rep.resumed_at || index_t(reports.size()) != rep.resumed_at)
        throw format_error(cat("stream: '", progress_file.string(), "' is damaged (", rep.resumed_at, " layers done of ", c.n_layers, ", with ",
                               layer_manifests.size(), " manifests and ", reports.size(), " reports)"));
      for (index_t l = 0; l < rep.resumed_at; ++l) rep.layers[std::size_t(l)] = reports.at(std::size_t(l));
      if (!saved.contains("sources"))
        throw format_error(cat("stream: '", progress_file.string(), "' was written by an older moeforge, which did not record what each layer ",
                               "was converted from; remove '", stage.string(), "' and convert again"));
      const auto& was = saved.at("sources");
      if (was.at("globals") != sources["globals"])
        throw config_error(cat("cannot resume into '", out, "': the embedding, final norm or classifier of '", model,
                               "' changed since the interrupted conversion began (hash ", was["globals"].dump(), ", now ", sources["globals"].dump(), ")"));
      if (!was.at("layers").is_array() || index_t(was["layers"].size()) != rep.resumed_at)
        throw format_error(cat("stream: '", progress_file.string(), "' is damaged (", was["layers"].size(), " source hashes for ", rep.resumed_at,
                               " layers done)"));
      // Every byte each finished layer was converted from: reading them costs
      // a fraction of converting them, and a changed layer would leave a model
      // that is neither the old conversion nor the new.
      for (index_t l = 0; l < rep.resumed_at; ++l) {
        const std::string now = detail::layer_source_hash(src, l);
        src.release();
        if (was["layers"][std::size_t(l)] != now)
          throw config_error(cat("cannot resume into '", out, "': layer ", l, "'s tensors in '", model, "' changed since that layer was converted (hash ",
                                 was["layers"][std::size_t(l)].dump(), ", now \"", now, "\"); remove '", stage.string(), "' and convert again"));
      }
      sources["layers"] = was["layers"];
      shards = saved.at("shards");
      const std::string hidden = saved.at("hidden").get<std::string>();
      // What a kill between two steps left: an older checkpoint's hidden
      // states, a temporary file. Only what progress.json names is kept.
      std::error_code ec;
      for (const auto& entry : fs::directory_iterator(stage, ec)) {
        const std::string name = entry.path().filename().string();
        if ((name.rfind("hidden-", 0) == 0 && name != hidden) || name.find(".tmp") != std::string::npos) fs::remove(entry.path(), ec);
      }
      if (rep.resumed_at < c.n_layers) {
        writer.emplace(io::native_shard_writer::resume(stage, opt.shard_bytes, shards));
        x = detail::load_hidden(stage / hidden, windows, c.dim);
      }
    } catch (const nlohmann::json::exception& e) {
      throw format_error(cat("stream: '", progress_file.string(), "' is damaged (", moeforge::detail::reason(e), ")"));
    }
  } else {
    std::error_code ec;
    fs::create_directories(stage, ec);
    if (ec) throw io_error(cat("stream: cannot create '", stage.string(), "': ", ec.message()));
    // Locked before it is emptied, never removed: of two runs starting at
    // once, one finds the other's lock instead of removing its directory.
    if (!stage_lock.held()) lock_stage();
    // A partial directory that never recorded progress holds nothing to keep.
    for (fs::directory_iterator it(stage, ec), end; !ec && it != end; it.increment(ec)) {
      std::error_code ignored;
      fs::remove_all(it->path(), ignored);
    }
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

  // After the last layer no hidden states are needed: a resume from there
  // only finishes the shards and the manifest.
  auto checkpoint = [&](index_t done) {
    const std::string hidden = done < c.n_layers ? cat("hidden-", done, ".safetensors") : std::string();
    if (!hidden.empty()) detail::save_hidden(stage / hidden, x);
    nlohmann::json reports = nlohmann::json::array();
    for (index_t l = 0; l < done; ++l) reports.push_back(rep.layers[std::size_t(l)]);
    shards = writer->state();
    detail::write_json_atomically(progress_file, {{"fingerprint", fingerprint},
                                                  {"layers_done", done},
                                                  {"manifests", layer_manifests},
                                                  {"reports", reports},
                                                  {"shards", shards},
                                                  {"sources", sources},
                                                  {"hidden", hidden}});
    std::error_code ec;
    if (done > 0) fs::remove(stage / cat("hidden-", done - 1, ".safetensors"), ec);
  };
  if (rep.resumed_at == 0) checkpoint(0);

  const index_t layers = c.n_layers;
  auto tell = [&](index_t l, const std::string& stage_name) {
    if (opt.progress) opt.progress(layer_progress{l, layers, stage_name, since(start)});
  };
  moeforge::detail::matrix_pool pool;  // each layer is read into the storage of the one written before it
  for (index_t l = rep.resumed_at; l < layers; ++l) {
    if (opt.stop_after_layers >= 0 && l >= opt.stop_after_layers) {
      rep.seconds = since(start);
      return rep;
    }
    auto t0 = clock::now();
    tell(l, "read");
    model::weights one = model::layer_model(c, src.layer(l, {}, &pool));
    sources["layers"].push_back(detail::layer_source_hash(src, l));  // while its pages are mapped
    pool.clear();
    src.release();  // the layer is in memory now, in FP32
    const model::transformer tr(one);
    rep.times.read += since(t0);

    // Attention: each window from position 0, as calib::ffn_inputs runs it.
    t0 = clock::now();
    tell(l, "attention");
    index_t total = 0;
    for (const auto& w : x) total += w.rows();
    matrix inputs(total, c.dim);
    index_t at = 0;
    model::forward_options fo;
    fo.stop_after_layer = 0;
    fo.on_ffn_input = [&](index_t, const_matrix_ref in) { inputs.middleRows(at, in.rows()) = in; };
    for (auto& w : x) {
      tr.layer_step(0, w, fo);
      at += w.rows();
    }
    rep.times.attention += since(t0);

    // The next layer's inputs: from the converted FFN, or (not sequential) from the untouched one.
    auto forward = [&] {
      t0 = clock::now();
      tell(l, "forward");
      for (auto& w : x) tr.ffn_step(0, w, {});
      rep.times.forward += since(t0);
    };
    auto& f = one.layers.front().ffn;
    if (matches(f, method.filter)) {
      if (!method.sequential) forward();
      t0 = clock::now();
      layer_visit v{l, f, inputs, [&, l](const std::string& stage) { tell(l, stage); }};
      rep.layers[std::size_t(l)] = method.convert_layer(v);
      rep.times.convert += since(t0);
      if (method.sequential) forward();
    } else {
      forward();
    }

    t0 = clock::now();
    tell(l, "write");
    // As the in-memory conversion stores it (native_save_options::as_source); every tensor the reader read is recorded.
    const auto type = [&](const std::string& name) {
      return io::detail::as_source_type(one.layers.front(), io::detail::name_in_layer(name), io::dtype::f32);
    };
    io::detail::for_each_layer_tensor(
        std::size_t(l), one.layers.front(),
        [&](const std::string& name, const matrix& m) { writer->add(name, {m.rows(), m.cols()}, m.data(), type(name)); },
        [&](const std::string& name, const vector& v) { writer->add(name, {v.size()}, v.data(), type(name)); });
    layer_manifests.push_back(io::detail::layer_json(one.layers.front()));
    io::detail::for_each_layer_tensor(
        std::size_t(l), one.layers.front(), [&](const std::string&, matrix& m) { hand_back(m, pool.sink()); }, [](const std::string&, vector&) {});
    one = model::weights();
    checkpoint(l + 1);
    rep.times.write += since(t0);
    tell(l, "done");
  }

  // Every step from here can be repeated: progress.json (all layers done)
  // stays until the model has moved into place, so an interruption or a
  // failure anywhere below is finished by a resume, never redone or lost.
  writer.reset();  // closes the open shard; complete() gives it its header
  io::native_shard_writer::complete(stage, opt.shard_bytes, shards);
  nlohmann::json provenance = opt.provenance;
  provenance["source"] = model;
  provenance["method"] = method.name;
  provenance["layers"] = rep.layers;
  io::detail::write_manifest(stage, c, layer_manifests, provenance, opt.attachments);
  // The output may have appeared while converting: it is replaced only when allowed.
  if (!opt.overwrite && fs::exists(fs::symlink_status(out_dir)))
    throw io_error(cat("output '", out, "' appeared during the conversion; the finished model stays in '", stage.string(), "' (--resume moves it)"));
  io::detail::move_into_place(stage, out_dir, opt.overwrite);
  std::error_code ec;
  fs::remove(out_dir / progress_file.filename(), ec);
  rep.complete = true;
  rep.seconds = since(start);
  return rep;
}

/// CMoE on every dense layer of a Hugging Face checkpoint, streamed (see
/// stream_convert); the same result as cmoe_model on the loaded model with
/// calib::ffn_inputs over `windows`.
inline stream_report cmoe_stream(const std::string& model, const std::vector<std::vector<std::int32_t>>& windows, const std::string& out,
                                 const cmoe_options& opt, const stream_options& so) {
  using moeforge::detail::cat;
  validate(opt);
  auto check = [&](const io::hf_config& h) {
    if (h.intermediate == 0) throw config_error(cat("cmoe: every FFN of '", model, "' is already an MoE: there is nothing to convert"));
    validate(opt.config, h.intermediate);
    resolve_ka(opt, h.intermediate);
    if (opt.fit.router == router_fit::quadratic && opt.fit.rank > h.model.dim)
      throw config_error(cat("cmoe: rank = ", opt.fit.rank, ", expected 1..", h.model.dim, " (the hidden size)"));
  };
  return stream_convert(model, windows, out,
                        {"cmoe", layer_filter::dense, true, to_json(opt), [&](layer_visit& v) { return to_json(cmoe_layer(v, opt)); }, check}, so);
}

namespace detail {

/// Refuses a method whose choice spans layers (`why`), before any work.
inline void need_layer_scope(bool layer_scope, const std::string& why) {
  if (!layer_scope)
    throw config_error(cat(why, ", which a streamed conversion (one layer at a time) cannot: use scope layer, or convert in memory"));
}

}  // namespace detail

/// Global scope with nothing to calibrate across layers (a threshold given,
/// or no drop policy) is the per-layer method on the untouched model's
/// inputs: each layer then computes alone what it computes among all.
inline bool global_scope_is_per_layer(const dualsparse_options& opt) {
  return opt.scope == drop_scope::global && !opt.drop_rate && !naee_calibrates_beta(opt);
}

/// Throws config_error unless DualSparse with `opt` has a per-layer form:
/// scope layer, or global scope that calibrates nothing
/// (global_scope_is_per_layer); a calibrated global threshold needs every
/// layer's routing.
inline void check_streamable(const dualsparse_options& opt) {
  detail::need_layer_scope(opt.scope == drop_scope::layer || global_scope_is_per_layer(opt),
                           "dualsparse: scope global calibrates one threshold on every MoE layer's routing");
}

/// Throws config_error unless MoNE with `opt` has a per-layer form (scope
/// layer): global scope ranks every layer's experts together.
inline void check_streamable(const mone_options& opt) {
  detail::need_layer_scope(opt.scope == mone_scope::layer, "mone: scope global ranks every MoE layer's experts together");
}

namespace detail {

/// The MoE layers of a source, refusing one with none.
inline std::vector<index_t> moe_layers_of(const io::hf_config& h, const config_error& none) {
  std::vector<index_t> out;
  for (index_t l = 0; l < h.model.n_layers; ++l)
    if (h.is_moe_layer(l)) out.push_back(l);
  if (out.empty()) throw none;
  return out;
}

}  // namespace detail

/// DualSparse-MoE at layer scope on every MoE layer of a Hugging Face
/// checkpoint, streamed (see stream_convert); the same result as
/// dualsparse_model on the loaded model. Global scope is refused when it
/// calibrates its one threshold (check_streamable), which needs every layer's
/// routing before the first layer is written; otherwise it runs per layer.
inline stream_report dualsparse_stream(const std::string& model, const std::vector<std::vector<std::int32_t>>& windows, const std::string& out,
                                       const dualsparse_options& opt, const stream_options& so) {
  using moeforge::detail::cat;
  validate(opt);
  check_streamable(opt);
  auto check = [&](const io::hf_config& h) {
    for (index_t l : detail::moe_layers_of(h, convert::detail::dualsparse_no_moe_layer())) {
      check_partition(h.expert_intermediate, opt.partition, cat("dualsparse: layer ", l), "the experts'");
      check_groups(opt, h.experts, cat("layer ", l));
      if (naee_calibrates_beta(opt) && h.top_k < 2) throw naee_needs_two(cat("layer ", l));
    }
  };
  dualsparse_options per_layer = opt;
  if (global_scope_is_per_layer(opt)) per_layer.scope = drop_scope::layer, per_layer.sequential = false;  // global never calibrates sequentially
  return stream_convert(model, windows, out,
                        {"dualsparse", layer_filter::moe, per_layer.sequential, to_json(opt),
                         [&](layer_visit& v) { return to_json(dualsparse_layer(v, per_layer).report); }, check},
                        so);
}

/// MoNE (or a baseline) at layer scope on every MoE layer of a Hugging Face
/// checkpoint, streamed (see stream_convert); the same result as mone_model on
/// the loaded model, `sequential` included. Global scope is refused: its
/// ranking needs every layer's statistics before the first layer is written.
inline stream_report mone_stream(const std::string& model, const std::vector<std::vector<std::int32_t>>& windows, const std::string& out,
                                 const mone_options& opt, const stream_options& so) {
  using moeforge::detail::cat;
  validate(opt);
  check_streamable(opt);
  auto check = [&](const io::hf_config& h) {
    for (index_t l : detail::moe_layers_of(h, convert::detail::mone_no_moe_layer())) layer_prune_count(h.experts, opt, cat("layer ", l));
  };
  return stream_convert(model, windows, out,
                        {"mone", layer_filter::moe, opt.sequential, to_json(opt), [&](layer_visit& v) { return to_json(mone_layer(v, opt)); }, check},
                        so);
}

}  // namespace moeforge::convert
