// moeforge convert cmoe: a dense model -> a CMoE model, saved as a native
// directory (model.safetensors + moeforge.json with the conversion report).
#include <cstdio>
#include <iostream>

#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "model_args.hpp"
#include "progress.hpp"
#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/convert/cmoe.hpp"
#include "moeforge/io/native.hpp"

namespace moeforge::cli {

namespace {

/// --ka accepts a count ("10") or a fraction of I ("0.1").
void set_ka(convert::cmoe_options& o, const args& a) {
  const double v = a.get_double("ka");
  if (v > 0 && v < 1)
    o.ka_fraction = v;
  else if (v >= 1 && v == double(index_t(v)))
    o.ka = index_t(v);
  else
    throw usage_error("moeforge convert cmoe: --ka must be a count >= 1 or a fraction in (0, 1), got '" + a.get("ka") + "'");
}

int convert_cmoe(int argc, char** argv) {
  args a("moeforge convert cmoe",
         "Convert a dense model into a CMoE mixture of experts without training (arXiv 2502.04416):\n"
         "shared neurons by activation rate, routed neurons by exact balanced clustering of activation markers,\n"
         "and an analytic router. Calibrates layer by layer on --calib and writes a native model directory.");
  add_model_options(a, true, "model-config");
  a.required("calib", "FILE", "calibration text (encoded as one BOS-prefixed stream, like eval)");
  a.required("config", "S{n}A{n}E{n}", "shared experts, active routed experts, total experts, e.g. S1A3E8");
  a.required("out", "DIR", "output directory (must not exist unless --force)");
  a.option("ka", "K", "markers per token: a count, or a fraction of the FFN width", "10");
  a.option("calib-tokens", "N", "calibration tokens", "8192");
  a.option("ctx", "N", "calibration window length (default: the model's context)");
  a.option("leftover", "shared|drop",
           "what happens to the I mod N neurons no expert takes: 'shared' keeps them always on (exact at full activation), "
           "'drop' removes them as the reference code does",
           "shared");
  a.option("method", "cmoe|random|param_cluster",
           "grouping: CMoE marker clustering; baselines: a seeded random equal split with the same router, or "
           "MoEfication-style balanced k-means on normalised gate rows with a centroid router",
           "cmoe");
  a.option("iterations", "N", "balanced-assignment passes (the reference does 1)", "1");
  a.option("seed", "N", "seed of the random split and of param_cluster's k-means++ start", "0");
  a.flag("force", "replace --out if it exists (only after the new model is complete)");
  a.flag("quiet", "no progress bar");
  a.flag("json", "print the conversion report as JSON on stdout");
  if (!a.parse(argc, argv)) return 0;

  // Refuse a bad output path before spending minutes converting.
  io::check_output_dir(a.get("out"), a.flag_set("force"));
  convert::cmoe_options o;
  o.config = convert::parse_cmoe_config(a.get("config"));
  set_ka(o, a);
  o.leftover = convert::parse_leftover_policy(a.get("leftover"));
  o.method = convert::parse_cmoe_method(a.get("method"));
  o.iterations = a.get_int("iterations");
  o.seed = std::uint64_t(a.get_int("seed"));

  model::weights w = load_model(a, "model-config");
  const auto tok = load_tokenizer(a, w);
  const index_t ctx = a.has("ctx") ? a.get_int("ctx") : w.config.seq_len;
  const auto windows = calib::calibration_windows(tok.encode(read_text_file(a.get("calib"))), ctx, a.get_int("calib-tokens"));
  if (o.leftover == convert::leftover_policy::drop)
    std::cerr << "moeforge convert: --leftover drop removes the I mod " << o.config.experts
              << " neurons no expert takes (the reference's behaviour); the model is no longer exact at full activation\n";

  progress_bar bar(a.flag_set("quiet"));
  const auto reports = convert::cmoe_model(
      w, [&](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, windows); }, o, std::ref(bar));

  nlohmann::json layers = nlohmann::json::array();
  for (const auto& r : reports) layers.push_back(convert::to_json(r));
  const nlohmann::json provenance{
      {"source", a.get("model")},
      {"conversion",
       {{"method", std::string(convert::method_name(o.method))},
        {"config", convert::to_string(o.config)},
        {"ka", a.get("ka")},
        {"leftover", std::string(convert::leftover_name(o.leftover))},
        {"iterations", o.iterations},
        {"seed", o.seed}}},
      {"calibration", {{"text", a.get("calib")}, {"tokens", a.get_int("calib-tokens")}, {"ctx", ctx}, {"windows", windows.size()}}},
      {"layers", layers}};
  io::native_save_options save;
  save.overwrite = a.flag_set("force");
  save.attachments.push_back({tokenizer_path(a), "tokenizer.bin"});
  io::save_native(w, a.get("out"), provenance, save);
  if (a.flag_set("json"))
    std::cout << provenance.dump() << "\n";
  else
    std::cout << "wrote " << a.get("out") << " (" << convert::to_string(o.config) << ", " << reports.size() << " layers)\n";
  return 0;
}

}  // namespace

int run_convert(int argc, char** argv) {
  static const command methods[] = {
      {"cmoe", "CMoE: training-free conversion of a dense FFN into an MoE", &convert_cmoe},
  };
  return dispatch("moeforge convert", methods, argc, argv);
}

}  // namespace moeforge::cli
