// moeforge convert cmoe: a dense model -> a CMoE model, saved as a native
// directory (model.safetensors + moeforge.json with the conversion report).
#include <algorithm>
#include <cstdio>
#include <iostream>

#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "conversion.hpp"
#include "moeforge/convert/cmoe.hpp"
#include "stream_convert.hpp"

namespace moeforge::cli {

namespace {

/// --ka accepts a count ("10") or a fraction of I ("0.1").
void set_ka(convert::cmoe_options& o, const args& a) {
  const double v = a.get_double("ka");
  if (v > 0 && v < 1)
    o.ka_fraction = v;
  else if (v >= 1 && v < 0x1p62 && v == double(index_t(v)))  // (a cast of a double past index_t's range is undefined)
    o.ka = index_t(v);
  else
    throw usage_error("moeforge convert cmoe: --ka must be a count >= 1 or a fraction in (0, 1), got '" + a.get("ka") + "'");
}

/// The fitting recipe: --preset, then any of --router/--rank/--compensate/--refit/--rounds given explicitly.
convert::fit_options fit_recipe(const args& a) {
  convert::fit_options f = convert::preset_fit(a.get_parsed("preset", convert::parse_cmoe_preset));
  if (a.has("router")) f.router = a.get_parsed("router", convert::parse_router_fit);
  if (a.has("rank")) f.rank = a.get_int("rank", 1);
  if (a.has("compensate")) f.compensate = a.get_parsed("compensate", convert::parse_compensation);
  if (a.has("refit")) f.refit = a.get_parsed("refit", convert::parse_refit);
  if (a.has("rounds")) f.rounds = a.get_int("rounds", 1);
  if (a.has("distill")) f.distill_steps = a.get_int("distill", 0);
  // Asked for by name: the size rule does not take them away.
  if (a.has("refit") || a.has("distill")) f.size_rule = false;
  return f;
}

/// What the report calls the recipe: the preset's name when nothing was overridden.
std::string recipe_name(const args& a, const convert::fit_options& f) {
  const auto preset = convert::preset_fit(convert::parse_cmoe_preset(a.get("preset")));
  const bool same = f.router == preset.router && (f.router != convert::router_fit::quadratic || f.rank == preset.rank) &&
                    f.compensate == preset.compensate && f.refit == preset.refit && f.rounds == preset.rounds &&
                    f.distill_steps == preset.distill_steps && f.distill_lr == preset.distill_lr && f.size_rule == preset.size_rule;
  return same ? a.get("preset") : "custom";
}

/// The method and recipe as the provenance records them.
nlohmann::json conversion_step(const convert::cmoe_options& o, const std::string& recipe) {
  nlohmann::json j = convert::to_json(o);
  j["recipe"] = recipe;
  return j;
}

int convert_cmoe(int argc, char** argv) {
  args a("moeforge convert cmoe",
         "Convert a dense model into a CMoE mixture of experts without training (arXiv 2502.04416):\n"
         "shared neurons by activation rate, routed neurons by exact balanced clustering of activation markers.\n"
         "--preset paper is the published method (analytic router); --preset best (the default) adds moeforge's\n"
         "fitted router, novice compensation, closed-form refit of the down projections and a short layer-local\n"
         "distillation on the calibration tokens (no labels, no end-to-end training).\n"
         "Calibrates layer by layer on --calib and writes a native model directory. A Hugging Face checkpoint is\n"
         "streamed: one layer in memory at a time, read from the memory-mapped shards, written to sharded output in\n"
         "its own dtype (BF16 stays BF16); an interrupted run continues with --resume.");
  add_model_options(a, true, "model-config");
  add_conversion_options(a, "16384 with --preset best, 8192 with paper");
  add_stream_options(a);
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
  a.option("iterations", "N", "balanced-assignment passes (the reference does 1); with --method param_cluster, its k-means passes (default 20)", "1");
  a.option("seed", "N", "seed of the random split and of param_cluster's k-means++ start", "0");
  a.option("preset", "paper|best",
           "paper: the published method exactly; best: quadratic router (rank 16) + novice compensation + refit of "
           "the down projections + 100 distillation steps (the most accurate recipe measured), under a size rule that "
           "keeps a wide layer within ~3x the paper's time: router and compensation fitted on the first "
           "max(4096, 2^36/(H*I)) calibration tokens, no refit above 4096 neurons, no distillation above "
           "steps*tokens*(computed neurons)*H = 2^36 (stories260K gets every step; a LLaMA-7B layer only the router "
           "and compensation); the switches below override single steps, and an explicit --refit or --distill turns "
           "the size rule off",
           "best");
  a.option("router", "analytic|linear|quadratic",
           "the paper's analytic router, or a ridge-fitted scorer on [x, 1] (linear) or on [x, 1, quadratic terms of a "
           "rank-R projection of x] (quadratic); default: the preset's");
  a.option("rank", "R", "rank of the quadratic router's projection, 1..hidden size; default: the preset's (16)");
  a.option("compensate", "none|novice",
           "novice: an expert a token skips contributes its mean calibration output; default: the preset's");
  a.option("refit", "none|down",
           "down: refit the experts' down projections so each layer reproduces the dense FFN on the calibration "
           "tokens; default: the preset's");
  a.option("rounds", "N", "rounds of (router fit, compensation, refit); default: the preset's (1)");
  a.option("distill", "STEPS",
           "then this many Adam steps of layer-local distillation of the experts' gate/up/down toward the dense FFN on "
           "the calibration tokens (0: off; small models only: it keeps every expert's activations); default: the preset's "
           "(paper 0, best 100, subject to the size rule)");
  if (!a.parse(argc, argv)) return 0;

  // Refuse a bad output path before spending minutes converting.
  io::check_output_dir(a.get("out"), a.flag_set("force"));
  convert::cmoe_options o;
  o.config = a.get_parsed("config", convert::parse_cmoe_config);
  set_ka(o, a);
  o.leftover = a.get_parsed("leftover", convert::parse_leftover_policy);
  o.method = a.get_parsed("method", convert::parse_cmoe_method);
  if (o.method != convert::cmoe_method::param_cluster)
    o.iterations = a.get_int("iterations", 1);
  else if (a.given("iterations"))
    o.cluster_iterations = a.get_int("iterations", 1);
  o.seed = std::uint64_t(a.get_int("seed"));
  o.fit = fit_recipe(a);
  convert::validate(o);
  const std::string recipe = recipe_name(a, o.fit);
  // The best preset fits a router on the tokens: on stories260K, 16384 of
  // them take S1A1E8 from 30.3 to 24.2 perplexity for 1.5× the time (32768: 22.3 for 5×).
  const index_t tokens = a.get("preset") == "best" ? 2 * default_calib_tokens : default_calib_tokens;
  if (streams(a))
    return convert_streamed(a, tokens, {{"conversion", conversion_step(o, recipe)}}, convert::to_string(o.config),
                            [&](const auto& windows, const auto& so) { return convert::cmoe_stream(a.get("model"), windows, a.get("out"), o, so); });

  model::weights w = load_model(a, "model-config");
  const dtype source = w.stored_dtype();
  const auto dense_layers = std::count_if(w.layers.begin(), w.layers.end(), [](const model::layer& l) { return std::holds_alternative<ffn>(l.ffn); });
  if (dense_layers == 0)
    throw config_error("convert cmoe: every FFN of '" + a.get("model") + "' is already an MoE: there is nothing to convert");
  for (const auto& l : w.layers)
    if (const auto* f = std::get_if<ffn>(&l.ffn)) a.get_parsed("config", [&](const std::string&) { convert::validate(o.config, f->intermediate()); return 0; });
  if (o.fit.router == convert::router_fit::quadratic && o.fit.rank > w.config.dim)
    throw usage_error("moeforge convert cmoe: --rank must be at most the hidden size " + std::to_string(w.config.dim) + ", got " +
                      std::to_string(o.fit.rank));
  const calibration cal = load_calibration(a, w, tokens);
  const bool leaves_over = std::any_of(w.layers.begin(), w.layers.end(), [&](const model::layer& l) {
    const auto* f = std::get_if<ffn>(&l.ffn);
    return f && f->intermediate() % o.config.experts != 0;
  });
  if (o.leftover == convert::leftover_policy::drop && leaves_over)
    std::cerr << "moeforge convert: --leftover drop removes the I mod " << o.config.experts
              << " neurons no expert takes (the reference's behaviour); the model is no longer exact at full activation\n";

  progress_bar bar(a.flag_set("quiet"));
  const auto reports = convert::cmoe_model(w, cal.inputs(), o, std::ref(bar));

  nlohmann::json layers = nlohmann::json::array();
  for (const auto& r : reports) layers.push_back(convert::to_json(r));
  save_conversion(a, w, source, {{"conversion", conversion_step(o, recipe)}, {"calibration", cal.description}, {"layers", layers}});
  if (!a.flag_set("json"))
    std::cout << "wrote " << a.get("out") << " (" << convert::to_string(o.config) << ", recipe " << recipe << ": router "
              << convert::router_fit_name(o.fit.router) << ", compensate " << convert::compensation_name(o.fit.compensate) << ", refit "
              << convert::refit_name(o.fit.refit) << ", distill " << o.fit.distill_steps << " steps; converted " << dense_layers << " of "
              << w.layers.size() << " layers)\n";
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
