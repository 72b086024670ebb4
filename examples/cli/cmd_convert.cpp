// moeforge convert cmoe: a dense model -> a CMoE model, saved as a native
// directory (model.safetensors + moeforge.json with the conversion report).
#include <cstdio>
#include <iostream>

#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "conversion.hpp"
#include "moeforge/convert/cmoe.hpp"

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
  add_conversion_options(a);
  a.required("config", "S{n}A{n}E{n}", "shared experts, active routed experts, total experts, e.g. S1A3E8");
  a.option("ka", "K", "markers per token: a count, or a fraction of the FFN width", "10");
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
  const calibration cal = load_calibration(a, w);
  if (o.leftover == convert::leftover_policy::drop)
    std::cerr << "moeforge convert: --leftover drop removes the I mod " << o.config.experts
              << " neurons no expert takes (the reference's behaviour); the model is no longer exact at full activation\n";

  progress_bar bar(a.flag_set("quiet"));
  const auto reports = convert::cmoe_model(w, cal.inputs(), o, std::ref(bar));

  nlohmann::json layers = nlohmann::json::array();
  for (const auto& r : reports) layers.push_back(convert::to_json(r));
  save_conversion(a, w,
                  {{"conversion",
                    {{"method", std::string(convert::method_name(o.method))},
                     {"config", convert::to_string(o.config)},
                     {"ka", a.get("ka")},
                     {"leftover", std::string(convert::leftover_name(o.leftover))},
                     {"iterations", o.iterations},
                     {"seed", o.seed}}},
                   {"calibration", cal.description},
                   {"layers", layers}});
  if (!a.flag_set("json"))
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
