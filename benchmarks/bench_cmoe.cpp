// moeforge-bench cmoe: perplexity and decode speed of CMoE and its baselines
// on stories260K (tinystories eval text, ctx 512), then moeforge's recipes
// beyond the paper (fitted routers, novice compensation, refit) and the
// oracle-router bound, with the realised active fraction (router cost included).
#include <chrono>
#include <cstdio>
#include <fstream>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "json_out.hpp"
#include "stories.hpp"

namespace moeforge::cli {

namespace {

/// The oracle bound of a converted model: every layer's router replaced by
/// router_kind::oracle (top experts by true output deviation; computes all).
model::weights with_oracle_router(model::weights w) {
  for (auto& l : w.layers) {
    auto& m = std::get<moe_layer>(l.ffn);
    m.router.kind = router_kind::oracle;
    m.router.weight = matrix::Zero(m.num_experts(), m.hidden());
    m.router.weight_up.resize(0, 0);
    m.router.bias.resize(0);
    m.router.projection.resize(0, 0);
    m.router.projection_bias.resize(0);
    m.router.weight_quad.resize(0, 0);
  }
  return w;
}

/// One row per recipe (paper → best, each step alone and combined) and the
/// oracle bounds, for S3A3E8, S1A1E4 and S1A1E8 with leftovers shared.
void recipe_rows(const bench::stories& data, double dense_ppl, index_t windows, nlohmann::json& out) {
  using convert::compensation_mode;
  using convert::refit_mode;
  using convert::router_fit;
  auto fit = [](router_fit r, compensation_mode c, refit_mode f) {
    convert::fit_options o;
    o.router = r;
    o.compensate = c;
    o.refit = f;
    return o;
  };
  struct recipe {
    const char* name;
    convert::fit_options fit;
    bool oracle;
  };
  const recipe recipes[] = {
      {"paper", convert::preset_fit(convert::cmoe_preset::paper), false},
      {"linear", fit(router_fit::linear, compensation_mode::none, refit_mode::none), false},
      {"linear+novice", fit(router_fit::linear, compensation_mode::novice, refit_mode::none), false},
      {"quadratic+novice", fit(router_fit::quadratic, compensation_mode::novice, refit_mode::none), false},
      {"paper+refit", fit(router_fit::analytic, compensation_mode::none, refit_mode::down), false},
      {"linear+novice+refit", fit(router_fit::linear, compensation_mode::novice, refit_mode::down), false},
      {"quadratic+novice+refit", fit(router_fit::quadratic, compensation_mode::novice, refit_mode::down), false},
      {"best (+distill)", convert::preset_fit(convert::cmoe_preset::best), false},
      {"oracle(paper experts)", convert::preset_fit(convert::cmoe_preset::paper), true},
      {"oracle+novice", fit(router_fit::analytic, compensation_mode::novice, refit_mode::none), true},
  };
  std::printf("\nrecipes (leftovers shared; active = realised FFN work incl. the router over all stored neurons)\n");
  std::printf("%-9s %-22s %-7s %-10s %-8s %s\n", "config", "recipe", "active", "ppl", "ppl/dense", "convert s");
  std::fflush(stdout);
  for (const char* config : {"S3A3E8", "S1A1E4", "S1A1E8"})
    for (const auto& r : recipes) {
      convert::cmoe_options o;
      o.config = convert::parse_cmoe_config(config);
      o.fit = r.fit;
      model::weights w = data.dense;
      const auto t0 = std::chrono::steady_clock::now();
      convert::cmoe_model(w, data.inputs(), o);
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (r.oracle) w = with_oracle_router(std::move(w));
      const auto res = model::perplexity(model::transformer(w), data.eval, 512, windows);
      const double active = res.work.active_fraction();
      out.push_back({{"config", config}, {"method", "cmoe"}, {"recipe", r.name},
                     {"router", std::string(r.oracle ? "oracle" : convert::router_fit_name(o.fit.router))},
                     {"rank", o.fit.router == router_fit::quadratic ? nlohmann::json(o.fit.rank) : nlohmann::json()},
                     {"compensate", std::string(convert::compensation_name(o.fit.compensate))},
                     {"refit", std::string(convert::refit_name(o.fit.refit))}, {"distill_steps", o.fit.distill_steps},
                     {"leftover", "shared"},
                     {"active_fraction", active}, {"ppl", res.ppl}, {"dense_ppl", dense_ppl}, {"convert_seconds", seconds}});
      std::printf("%-9s %-22s %-7.3f %-10.4f %-8.3f %.1f\n", config, r.name, active, res.ppl, res.ppl / dense_ppl, seconds);
      std::fflush(stdout);
    }
}

}  // namespace

int bench_cmoe(int argc, char** argv) {
  args a("moeforge-bench cmoe", "CMoE quality table on stories260K: perplexity and decode speed per configuration.");
  bench::add_stories_options(a);
  a.option("part", "all|paper|recipes", "the paper's rows and baselines, moeforge's recipes and the oracle bound, or both", "all");
  if (!a.parse(argc, argv)) return 0;
  const bench::json_output json = bench::json_option(a);
  const std::string part = a.get("part");
  if (part != "all" && part != "paper" && part != "recipes")
    throw usage_error("moeforge-bench cmoe: --part must be all, paper or recipes, got '" + part + "'");
  const auto counts = bench::read_stories_counts(a);
  const index_t windows = counts.eval_windows, steps = counts.decode_steps;
  const bench::stories data = bench::load_stories(a.get("data"), counts.calib_tokens);
  const model::weights& dense = data.dense;
  const auto& eval = data.eval;
  const index_t neurons = std::get<ffn>(dense.layers[0].ffn).intermediate();

  const double dense_ppl = model::perplexity(model::transformer(dense), eval, 512, windows).ppl;
  const double dense_tps = model::decode_tokens_per_second(model::transformer(dense), steps);
  using convert::cmoe_method;
  using convert::leftover_policy;
  struct row {
    std::string config;
    cmoe_method method;
    double ka_fraction;  // 0: K_a = 10
    leftover_policy leftover;
    std::string variant;  // "" or "S0" (the same experts and active count, no shared expert)
  };
  std::vector<row> rows;
  // The reference's rows: leftovers dropped (cmoe_options defaults to `shared`, so set drop explicitly).
  for (const char* c : {"S1A1E4", "S1A2E4", "S1A3E4", "S2A2E8", "S3A3E8", "S1A1E8", "S2A2E16", "S4A4E16"})
    for (double f : {0.0, 0.1}) rows.push_back({c, cmoe_method::cmoe, f, leftover_policy::drop, ""});
  // Leftovers kept in the shared expert (I = 172 is not a multiple of 8 or 16).
  rows.push_back({"S3A3E8", cmoe_method::cmoe, 0.0, leftover_policy::shared, ""});
  rows.push_back({"S2A6E8", cmoe_method::cmoe, 0.0, leftover_policy::drop, ""});
  rows.push_back({"S2A6E8", cmoe_method::cmoe, 0.0, leftover_policy::shared, ""});
  // Baselines, leftovers dropped like the reference rows they are compared with.
  for (const char* c : {"S1A1E4", "S3A3E8", "S1A1E8"}) {
    rows.push_back({c, cmoe_method::random, 0.0, leftover_policy::drop, ""});
    rows.push_back({c, cmoe_method::param_cluster, 0.0, leftover_policy::drop, ""});
    rows.push_back({c, cmoe_method::cmoe, 0.0, leftover_policy::drop, "S0"});
  }

  nlohmann::json out = nlohmann::json::array();
  out.push_back({{"config", "dense"}, {"method", "dense"}, {"ka", nullptr}, {"leftover", nullptr}, {"active_fraction", 1.0},
                 {"ppl", dense_ppl}, {"dense_ppl", dense_ppl}, {"decode_tok_s", dense_tps}, {"dense_decode_tok_s", dense_tps}});
  std::printf("stories260K (I = %lld), %lld calibration tokens, tinystories eval ctx 512\n", (long long)neurons,
              (long long)counts.calib_tokens);
  std::printf("%-9s %-14s %-5s %-9s %-7s %-10s %-8s %s\n", "config", "method", "ka", "leftover", "active", "ppl", "ppl/dense", "decode tok/s");
  std::printf("%-9s %-14s %-5s %-9s %-7.3f %-10.4f %-8.3f %.0f\n", "dense", "dense", "-", "-", 1.0, dense_ppl, 1.0, dense_tps);
  std::fflush(stdout);
  if (part == "recipes") rows.clear();
  for (const auto& r : rows) {
    convert::cmoe_options o;
    o.config = convert::parse_cmoe_config(r.config);
    o.method = r.method;
    o.leftover = r.leftover;
    if (r.ka_fraction > 0) o.ka_fraction = r.ka_fraction;
    if (r.variant == "S0") {  // no shared expert: the shared slots become routed ones, active count kept
      o.config.active += o.config.shared;
      o.config.shared = 0;
    }
    model::weights w = dense;
    convert::cmoe_model(w, data.inputs(), o);
    const model::transformer tr(w);
    const double ppl = model::perplexity(tr, eval, 512, windows).ppl;
    const double tps = model::decode_tokens_per_second(tr, steps);
    // The converted model's own fraction, not (S + A) / E: leftover neurons kept
    // in the shared expert make it wider than the routed ones (S3A3E8: 0.756).
    const double active = model::active_ffn_fraction(w);
    const index_t ka = convert::resolve_ka(o, neurons);
    const std::string config = convert::to_string(o.config);
    std::string method = std::string(convert::method_name(o.method));
    if (!r.variant.empty()) method += "-" + r.variant;
    const std::string leftover(convert::leftover_name(o.leftover));
    out.push_back({{"config", config}, {"method", method}, {"ka", ka}, {"leftover", leftover}, {"active_fraction", active},
                   {"ppl", ppl}, {"dense_ppl", dense_ppl}, {"decode_tok_s", tps}, {"dense_decode_tok_s", dense_tps}});
    std::printf("%-9s %-14s %-5lld %-9s %-7.3f %-10.4f %-8.3f %.0f\n", config.c_str(), method.c_str(), (long long)ka, leftover.c_str(),
                active, ppl, ppl / dense_ppl, tps);
    std::fflush(stdout);
  }
  if (part != "paper") recipe_rows(data, dense_ppl, windows, out);
  json.write(out);
  return 0;
}

}  // namespace moeforge::cli
