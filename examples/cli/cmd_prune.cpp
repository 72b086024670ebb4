// moeforge prune mone: MoNE expert pruning (or one of its baselines) on an MoE
// model — a CMoE conversion, Mixtral, Qwen2-MoE — saved as a native directory
// whose moeforge.json carries the pruning report. A Hugging Face checkpoint
// is streamed one layer at a time (stream_convert.hpp), which needs the
// per-layer choice (--scope layer).
#include <filesystem>
#include <iostream>

#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "conversion.hpp"
#include "moeforge/convert/mone.hpp"
#include "stream_convert.hpp"

namespace moeforge::cli {

namespace {

/// Warns when pruning left a layer fewer expert slots than its top_k (which it lowered).
void warn_fewer_slots(index_t layer, index_t before, index_t after) {
  if (after != before)
    std::cerr << "moeforge prune mone: layer " << layer << " has " << after << " expert slot(s) left, fewer than its top_k of " << before
              << ": top_k is now " << after << "\n";
}

int prune_mone(int argc, char** argv) {
  args a("moeforge prune mone",
         "MoNE (Zhang et al. 2025): replace each MoE layer's most redundant routed experts (lowest output spread x routing\n"
         "mass on --calib) by novices, constant vectors equal to the expert's mean output, still weighted by the router's\n"
         "gate; the pruned experts' weights are freed. Baselines: zero novice, frequency pruning (expert and router row\n"
         "removed), REAP, random, and a per-layer search for the set with the least output error. Writes a native model.\n"
         "A Hugging Face checkpoint is streamed: one layer in memory at a time, written to sharded output in its own\n"
         "dtype; this needs --scope layer (the global ranking needs every layer's statistics first: use --in-memory\n"
         "for it); an interrupted run continues with --resume.");
  add_model_options(a, true, "model-config");
  add_conversion_options(a);
  add_stream_options(a);
  a.option("ratio", "R", "share of the real experts to prune, in [0, 1): round(R x E) per layer (of all layers with --scope global)");
  a.option("count", "N", "experts to prune per layer (in the whole model with --scope global), instead of --ratio");
  a.option("scope", "layer|global", "prune the same number in every layer, or rank all layers' experts together "
           "(global keeps at least one real expert per layer)", "layer");
  a.option("method", "mone|zero|frequency|reap|random|search",
           "mone: lowest var x freq, novice = mean output; zero: the same experts, zero novice; frequency: lowest routing mass, "
           "removed with their router rows; reap: lowest mean gate x output norm, removed; random: seeded, novice; "
           "search: per layer the set whose novices change the output least (exhaustive up to 10^4 subsets, else greedy)",
           "mone");
  a.option("replace", "novice|zero|remove", "what a pruned expert becomes (default: the method's own, see --method)");
  a.option("freq", "all|routed", "routing mass divided by all calibration tokens (the reference code) or by those routed "
           "to the expert (the paper's text)", "all");
  a.option("seed", "S", "seed of --method random", "0");
  a.flag("unpruned-inputs", "calibrate every layer on the unpruned model (default: layer l on the model pruned up to l-1; "
         "--scope global always does this)");
  if (!a.parse(argc, argv)) return 0;
  if (a.has("ratio") == a.has("count")) throw usage_error("moeforge prune mone: give exactly one of --ratio and --count");

  // Everything that can be refused is refused before the model loads or calibrates.
  io::check_output_dir(a.get("out"), a.flag_set("force"));
  convert::mone_options o;
  if (a.has("ratio"))
    o.ratio = a.get_double("ratio", [](double v) { return v >= 0 && v < 1; }, "in [0, 1)");
  else
    o.count = index_t(a.get_int("count", 0));
  o.scope = a.get_parsed("scope", [](const std::string& v) { return convert::parse_mone_scope(v); });
  o.method = a.get_parsed("method", [](const std::string& v) { return convert::parse_mone_method(v); });
  if (a.has("replace")) o.replacement = a.get_parsed("replace", [](const std::string& v) { return convert::parse_replacement(v); });
  o.freq = a.get_parsed("freq", [](const std::string& v) { return convert::parse_freq_form(v); });
  o.seed = std::uint64_t(a.get_int("seed", 0));
  o.sequential = !a.flag_set("unpruned-inputs");
  refuse_as_usage("moeforge prune mone", [&] { convert::validate(o); });
  const std::string calib_file = a.get("calib");
  std::error_code ec;
  if (std::filesystem::is_regular_file(calib_file, ec) && std::filesystem::file_size(calib_file, ec) == 0 && !ec)
    throw config_error("--calib '" + calib_file + "': the calibration text is empty (MoNE measures every expert on it)");
  // What both paths record of the method; the in-memory one adds its report.
  nlohmann::json step{{"method", "mone"}, {"options", convert::to_json(o)}};
  if (streams(a)) {
    check_streamable(o, "moeforge prune mone");
    return convert_streamed(
        a, default_calib_tokens, {{"pruning", step}}, "mone, " + a.get("method"),
        [&](const auto& windows, const auto& so) { return convert::mone_stream(a.get("model"), windows, a.get("out"), o, so); },
        [](const nlohmann::json& l) { warn_fewer_slots(l.at("layer").get<index_t>(), l.at("top_k").at("before").get<index_t>(), l.at("top_k").at("after").get<index_t>()); });
  }

  model::weights w = load_model(a, "model-config");
  const dtype source = w.stored_dtype();
  convert::validate(o, w);  // a dense model, or a count no layer can give
  const calibration cal = load_calibration(a, w);
  progress_bar bar(a.flag_set("quiet"));
  const auto report = convert::mone_model(w, cal.inputs(), o, std::ref(bar));
  for (const auto& l : report.layers) warn_fewer_slots(l.layer, l.top_k_before, l.top_k_after);
  step["report"] = convert::to_json(report);
  save_conversion(a, w, source, {{"pruning", step}, {"calibration", cal.description}});
  if (!a.flag_set("json"))
    std::cout << "wrote " << a.get("out") << " (" << report.method << ", " << report.replacement << ": " << report.experts_pruned
              << " experts pruned in " << report.layers.size() << " MoE layers, " << report.params_freed << " parameters freed, "
              << report.params_freed * std::int64_t(dtype_size(source)) << " bytes as " << dtype_name(source) << ")\n";
  return 0;
}

}  // namespace

int run_prune(int argc, char** argv) {
  static const command methods[] = {
      {"mone", "MoNE: replace redundant experts by novices (and the pruning baselines)", &prune_mone},
  };
  return dispatch("moeforge prune", methods, argc, argv);
}

}  // namespace moeforge::cli
