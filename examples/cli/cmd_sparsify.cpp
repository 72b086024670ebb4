// moeforge sparsify dualsparse: DualSparse-MoE on an MoE model (a CMoE
// conversion, Mixtral, Qwen2-MoE): exact partition and neuron reconstruction,
// and a drop policy calibrated on text, saved as a native directory. A Hugging
// Face checkpoint is streamed one layer at a time (stream_convert.hpp), which
// needs per-layer thresholds (--scope layer).
#include <algorithm>
#include <cmath>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "conversion.hpp"
#include "moeforge/convert/dualsparse.hpp"
#include "stream_convert.hpp"

namespace moeforge::cli {

namespace {

/// "0,0,1,1" → {0, 0, 1, 1}.
std::vector<index_t> parse_placement(const std::string& text) {
  std::vector<index_t> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    std::size_t end = 0;
    long long v = -1;
    try {
      v = std::stoll(item, &end);
    } catch (const std::exception&) {
      end = 0;
    }
    if (end == 0 || end != item.size() || v < 0)
      throw usage_error("moeforge sparsify dualsparse: --placement expects comma-separated group numbers >= 0, got '" + text + "'");
    out.push_back(index_t(v));
  }
  return out;
}

int sparsify_dualsparse(int argc, char** argv) {
  args a("moeforge sparsify dualsparse",
         "DualSparse-MoE (arXiv 2508.18376) on an MoE model: split experts into sub-experts and order their neurons by\n"
         "importance (both exact), then store a drop policy that skips low-score token-expert work at inference time,\n"
         "its threshold given or calibrated on --calib to a target drop rate. Writes a native model directory.\n"
         "A Hugging Face checkpoint is streamed: one layer in memory at a time, written to sharded output in its own\n"
         "dtype; a threshold calibrated for all layers at once (--drop-rate, or naee's beta, at --scope global) needs\n"
         "every layer's routing first: use --scope layer or --in-memory for it; an interrupted run continues with --resume.");
  add_model_options(a, true, "model-config");
  add_conversion_options(a);
  add_stream_options(a);
  a.option("partition", "P", "sub-experts per routed expert (partial transformation, exact)", "1");
  a.option("metric", "none|a|b|c|d",
           "neuron importance over the tokens routed to each expert: a Σact(g), b Σ|act(g)|, c Σact(g)·u, d Σ|act(g)·u|; "
           "none keeps the original order",
           "none");
  a.option("major-fraction", "F", "share of each expert's neurons in its major part (2t computes only these for mid scores)", "0.5");
  a.option("policy", "none|1t|2t|naee|top-p", "drop policy", "none");
  a.option("threshold", "T", "the policy's threshold in [0, 1] (1t/2t: on the normalised score; naee: beta; top-p: p)");
  a.option("drop-rate", "D", "calibrate the threshold so that this share of the work is dropped on --calib, in [0, 1)");
  a.option("scope", "global|layer", "one threshold for all layers, or one per layer", "global");
  a.option("margin", "M", "2t: T_major = T - M, T_minor = T + M", "0.01");
  a.option("groups", "D", "load-aware thresholds over D groups of experts (expert parallelism; 1t/2t)");
  a.option("placement", "G,G,...", "the group of each expert (default: contiguous blocks)");
  if (!a.parse(argc, argv)) return 0;

  io::check_output_dir(a.get("out"), a.flag_set("force"));
  convert::dualsparse_options o;
  o.partition = a.get_int("partition", 1);
  o.metric = a.get_parsed("metric", [](const std::string& v) { return calib::parse_importance(v); });
  o.major_fraction = a.get_double("major-fraction", [](double v) { return v > 0 && v <= 1; }, "in (0, 1]");
  o.policy.kind = a.get_parsed("policy", [](const std::string& v) { return parse_drop_kind(v); });
  o.policy.margin = a.get_float("margin", [](float v) { return v >= 0 && std::isfinite(v); }, "finite and at least 0");
  if (a.has("threshold")) o.threshold = a.get_double("threshold", [](double v) { return v >= 0 && v <= 1; }, "in [0, 1]");
  if (a.has("drop-rate")) o.drop_rate = a.get_double("drop-rate", [](double v) { return v >= 0 && v < 1; }, "in [0, 1)");
  o.scope = a.get_parsed("scope", [](const std::string& v) { return convert::parse_drop_scope(v); });
  if (a.has("groups")) o.groups = a.get_int("groups", 0);
  if (a.has("placement")) o.placement = parse_placement(a.get("placement"));
  refuse_as_usage("moeforge sparsify dualsparse", [&] { convert::validate(o); });  // before the model loads: a typo costs nothing
  // What both paths record of the method; the in-memory one adds its report.
  nlohmann::json step{{"method", "dualsparse"}, {"options", convert::to_json(o)}};
  if (streams(a)) {
    check_streamable(o, "moeforge sparsify dualsparse");
    return convert_streamed(a, default_calib_tokens, {{"sparsification", step}},
                            "dualsparse, policy " + a.get("policy"),
                            [&](const auto& windows, const auto& so) { return convert::dualsparse_stream(a.get("model"), windows, a.get("out"), o, so); });
  }

  model::weights w = load_model(a, "model-config");
  const dtype source = w.stored_dtype();
  const calibration cal = load_calibration(a, w);
  progress_bar bar(a.flag_set("quiet"));
  o.progress = std::ref(bar);
  const auto report = convert::dualsparse_model(w, cal.inputs(), o);
  step["report"] = convert::to_json(report);
  save_conversion(a, w, source, {{"sparsification", step}, {"calibration", cal.description}});
  if (!a.flag_set("json")) {
    std::cout << "wrote " << a.get("out") << " (policy " << a.get("policy");
    if (!report.layers.empty() && o.policy.active()) {
      const auto [low, high] = std::minmax_element(report.layers.begin(), report.layers.end(),
                                                   [](const auto& x, const auto& y) { return x.policy.threshold < y.policy.threshold; });
      std::cout << ", threshold " << low->policy.threshold;
      if (high->policy.threshold != low->policy.threshold) std::cout << ".." << high->policy.threshold << " over the layers";
    }
    std::cout << ", drop rate on the calibration text " << report.drop_rate_calib << ")\n";
  }
  return 0;
}

}  // namespace

int run_sparsify(int argc, char** argv) {
  static const command methods[] = {
      {"dualsparse", "DualSparse-MoE: partition, reconstruct and drop low-score expert work", &sparsify_dualsparse},
  };
  return dispatch("moeforge sparsify", methods, argc, argv);
}

}  // namespace moeforge::cli
