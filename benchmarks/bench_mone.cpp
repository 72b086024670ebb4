// moeforge-bench mone: MoNE and its baselines at 12.5 / 25 / 50 % pruning on
// stories260K converted by CMoE — perplexity on the evaluation text (ctx 512),
// model bytes and decode speed, all measured in this run, the unpruned CMoE
// model of each configuration as the reference row.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <optional>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "json_out.hpp"
#include "moeforge/convert/mone.hpp"
#include "stories.hpp"

namespace moeforge::cli {

namespace {

/// Best of three runs: a 260K-parameter model decodes in milliseconds, so one run is mostly noise.
double decode_speed(const model::weights& w, index_t steps) {
  const model::transformer tr(w);
  double best = 0;
  for (int i = 0; i < 3; ++i) best = std::max(best, model::decode_tokens_per_second(tr, steps));
  return best;
}

}  // namespace

int bench_mone(int argc, char** argv) {
  args a("moeforge-bench mone",
         "MoNE and its baselines (zero novice, frequency, REAP, random, output-error search) at 12.5/25/50% pruning on\n"
         "stories260K converted by CMoE: perplexity, FFN work per token, model bytes and decode tok/s, with the unpruned\n"
         "model of each configuration as a row.");
  bench::add_stories_options(a);
  a.option("configs", "LIST", "CMoE configurations, comma-separated", "S0A2E8,S1A3E8,S2A2E16")
      .option("replacements", "LIST",
              "replacements to run each method with, comma-separated: 'default' (the method's own), novice, zero, remove "
              "(e.g. default,novice,remove separates a method's choice of experts from what replaces them)",
              "default");
  if (!a.parse(argc, argv)) return 0;
  const bench::json_output json = bench::json_option(a);
  const auto replacements = a.get_list(
      "replacements",
      [](const std::string& r) -> std::optional<convert::prune_replacement> {
        if (r == "default") return std::nullopt;
        return convert::parse_replacement(r);
      },
      "default, novice, zero, remove");
  const auto configs = bench::cmoe_config_list(a, "configs");
  const auto counts = bench::read_stories_counts(a);
  const index_t windows = counts.eval_windows, steps = counts.decode_steps;
  const bench::stories data = bench::load_stories(a.get("data"), counts.calib_tokens);

  std::printf("stories260K, %lld calibration tokens, tinystories eval ctx 512%s; work = FFN neuron products per token / unpruned\n",
              (long long)counts.calib_tokens, windows > 0 ? (" (" + std::to_string(windows) + " windows)").c_str() : "");
  std::printf("%-8s %-10s %-8s %-6s %-7s %-10s %-9s %-6s %-9s %s\n", "config", "method", "replace", "ratio", "pruned", "ppl", "ppl/base",
              "work", "model KB", "decode tok/s");
  nlohmann::json rows = nlohmann::json::array();
  struct measured {
    double ppl, work;
  };
  // Work per token: what the FFNs computed on the evaluation text (novice pairs cost nothing).
  auto emit = [&](const std::string& config, const std::string& method, const std::string& replace, double ratio, index_t pruned,
                  const model::weights& w, const measured* base) {
    const auto pr = model::perplexity(model::transformer(w), data.eval, 512, windows);
    const measured m{pr.ppl, (pr.work.shared + pr.work.kept) / double(pr.work.tokens)};
    const std::int64_t bytes = std::int64_t(model::parameter_count(w)) * convert::native_weight_bytes;  // as saved (F32)
    const double tps = decode_speed(w, steps);
    std::printf("%-8s %-10s %-8s %-6.3f %-7lld %-10.4f %-9.3f %-6.3f %-9.1f %.0f\n", config.c_str(), method.c_str(), replace.c_str(), ratio,
                (long long)pruned, m.ppl, base ? m.ppl / base->ppl : 1.0, base ? m.work / base->work : 1.0, double(bytes) / 1024.0, tps);
    std::fflush(stdout);
    rows.push_back({{"config", config}, {"method", method}, {"replacement", replace}, {"ratio", ratio}, {"experts_pruned", pruned},
                    {"ppl", m.ppl}, {"ffn_work_per_token", m.work}, {"model_bytes", bytes}, {"decode_tok_s", tps}});
    return m;
  };

  for (const auto& config : configs) {
    const model::weights base = bench::cmoe_model(data, config);
    const measured unpruned = emit(config, "unpruned", "-", 0.0, 0, base, nullptr);
    for (const auto method : convert::all_mone_methods) {
      std::vector<convert::prune_replacement> done;  // 'default' and the method's own name are one run
      for (const auto& r : replacements) {
        const auto replacement = r.value_or(convert::default_replacement(method));
        if (std::count(done.begin(), done.end(), replacement)) continue;
        done.push_back(replacement);
        if (method == convert::mone_method::search && replacement == convert::prune_replacement::remove) continue;
        for (const double ratio : {0.125, 0.25, 0.5}) {
          model::weights w = base;
          convert::mone_options o;
          o.method = method;
          o.ratio = ratio;
          o.replacement = replacement;
          const auto rep = convert::mone_model(w, data.inputs(), o);
          emit(config, rep.method, rep.replacement, ratio, rep.experts_pruned, w, &unpruned);
        }
      }
    }
  }
  json.write(rows);
  return 0;
}

}  // namespace moeforge::cli
