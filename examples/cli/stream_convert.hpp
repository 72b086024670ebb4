// The streamed path of the model-transforming commands (convert cmoe,
// sparsify dualsparse, prune mone): a Hugging Face checkpoint is converted one
// layer at a time from its memory-mapped shards into a sharded native
// directory (convert/stream.hpp), so a 7B model converts on a machine that
// cannot hold it in FP32. It is taken for every Hugging Face directory or
// index — it computes bit for bit what the in-memory path computes, and
// both write it in the source's dtype — and `--in-memory` forces the old
// path (everything loaded in FP32, one model.safetensors).
#pragma once

#include <functional>
#include <iostream>
#include <limits>
#include <string>

#include <nlohmann/json.hpp>

#include "conversion.hpp"
#include "moeforge/convert/stream.hpp"

namespace moeforge::cli {

/// --resume, --shard-size, --in-memory.
inline void add_stream_options(args& a) {
  a.flag("resume", "Hugging Face input: continue an interrupted conversion into --out (refused if the options, the calibration or the model differ, checked to the byte for what is already converted)");
  a.option("shard-size", "MB", "Hugging Face input: at most this many MB per output shard", "4096");
  a.flag("in-memory", "load the whole model in FP32 and convert it in memory instead of streaming a Hugging Face checkpoint");
}

/// Whether --model is converted by streaming.
inline bool streams(const args& a) {
  namespace fs = std::filesystem;
  const fs::path p(a.get("model"));
  return !a.flag_set("in-memory") && (io::is_hf_dir(p.string()) || p.filename() == "model.safetensors.index.json");
}

/// The library's refusal to stream a method whose choice spans layers
/// (convert::check_streamable), as a usage error naming the flags out of it.
template <class Options>
void check_streamable(const Options& o, const std::string& command) {
  try {
    convert::check_streamable(o);
  } catch (const config_error& e) {
    throw usage_error(command + ": --scope: " + detail::reason(e) + " (--scope layer, or --in-memory: loads the whole model in FP32)");
  }
}

/// A streamed conversion of --model into --out: what the method's *_stream
/// function is called with.
using stream_run = std::function<convert::stream_report(const std::vector<std::vector<std::int32_t>>& windows, const convert::stream_options&)>;

/// Streams --model through `run` with `tokens` calibration tokens unless
/// --calib-tokens says otherwise; `step` is what the provenance records of
/// the method (beside the calibration and each layer's report), `what` names
/// it in the summary; `on_layer_report`, when given, sees each converted
/// layer's report (a method's warnings).
inline int convert_streamed(const args& a, index_t tokens, const nlohmann::json& step, const std::string& what, const stream_run& run,
                            const std::function<void(const nlohmann::json&)>& on_layer_report = {}) {
  apply_threads(a);
  const std::string config = a.has("model-config") ? a.get("model-config") : io::detail::sibling_config(a.get("model"));
  const model::config c = io::read_hf_config(config).model;
  const calibration cal = load_calibration(a, c, tokens);
  convert::stream_options so;
  so.shard_bytes = std::uint64_t(a.get_int("shard-size", 1, std::numeric_limits<std::int64_t>::max() >> 20)) << 20;
  so.resume = a.flag_set("resume");
  so.overwrite = a.flag_set("force");
  so.attachments.push_back({tokenizer_path(a), "tokenizer.bin"});
  so.provenance = step;
  so.provenance["calibration"] = cal.description;
  progress_bar bar(a.flag_set("quiet"));
  so.progress = std::ref(bar);
  const auto rep = run(cal.windows, so);
  if (on_layer_report)
    for (const auto& l : rep.layers)
      if (!l.is_null()) on_layer_report(l);
  // What the in-memory path prints (the provenance, each layer's report in it) and the streaming's own figures.
  nlohmann::json summary = so.provenance;
  summary["source"] = a.get("model");
  summary["layers"] = rep.layers;
  summary["out"] = a.get("out");
  summary["resumed_at"] = rep.resumed_at;
  summary["seconds"] = rep.seconds;
  summary["stage_seconds"] = convert::to_json(rep.times);
  if (a.flag_set("json")) {
    std::cout << detail::json_text(summary) << "\n";
  } else {
    const auto& t = rep.times;
    std::cout << "wrote " << a.get("out") << " (" << what << ", streamed " << c.n_layers - rep.resumed_at << " of " << c.n_layers
              << " layers in " << rep.seconds << " s: read " << t.read << " s, attention " << t.attention << " s, convert " << t.convert
              << " s, forward " << t.forward << " s, write " << t.write << " s)\n";
  }
  return 0;
}

}  // namespace moeforge::cli
