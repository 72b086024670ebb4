// moeforge-bench dualsparse, quality part: stories260K converted by CMoE,
// then DualSparse-MoE with every policy and reconstruction metric at a series
// of target drop rates: the realised drop rate on calibration and evaluation
// text and the perplexity; and the load-aware thresholds' group loads.
#include <cstdio>
#include <limits>

#include <nlohmann/json.hpp>

#include "dualsparse_quality.hpp"
#include "moeforge/convert/dualsparse.hpp"
#include "moeforge/io/load.hpp"
#include "stories.hpp"

namespace moeforge::cli::dualsparse_bench {

namespace {

struct variant {
  drop_kind policy;
  calib::importance_metric metric;
};

/// Mean over layers of a group figure.
template <class F>
double layer_mean(const convert::dualsparse_report& r, F&& f) {
  double s = 0;
  for (const auto& l : r.layers) s += f(*l.groups);
  return s / double(r.layers.size());
}

}  // namespace

std::vector<nlohmann::json> quality(const quality_options& o) {
  using calib::importance_metric;
  const bench::stories data = bench::load_stories(o.data, o.calib_tokens);
  // 1t computes an expert whole or not at all, so reconstruction cannot matter
  // to it; 2t is shown without reconstruction (the paper's baseline) and with each metric.
  const std::vector<variant> variants{{drop_kind::one_t, importance_metric::none},   {drop_kind::two_t, importance_metric::none},
                                      {drop_kind::two_t, importance_metric::act},    {drop_kind::two_t, importance_metric::abs_act},
                                      {drop_kind::two_t, importance_metric::prod},   {drop_kind::two_t, importance_metric::abs_prod},
                                      {drop_kind::naee, importance_metric::none},    {drop_kind::top_p, importance_metric::none}};
  std::vector<nlohmann::json> rows;
  std::printf("\nquality: stories260K by CMoE, %lld calibration tokens, tinystories eval (ctx 512)\n", (long long)o.calib_tokens);
  std::printf("%-8s %-6s %-6s %7s %8s %8s %10s %8s\n", "config", "policy", "metric", "target", "d_calib", "d_eval", "ppl", "ppl/base");
  const std::vector<std::string> models = o.model.empty() ? o.configs : std::vector<std::string>{o.model};
  for (const auto& config : models) {
    const model::weights base = o.model.empty() ? bench::cmoe_model(data, config) : io::load_model(o.model);
    const double base_ppl = model::perplexity(model::transformer(base), data.eval, 512, o.eval_windows).ppl;
    auto row = [&](const char* policy, const char* metric, std::optional<double> target, double d_calib, const model::perplexity_result& r) {
      std::printf("%-8s %-6s %-6s %7s %8.4f %8.4f %10.4f %8.3f\n", config.c_str(), policy, metric,
                  target ? std::to_string(*target).substr(0, 4).c_str() : "beta", d_calib, r.work.drop_rate(), r.ppl, r.ppl / base_ppl);
      std::fflush(stdout);
      rows.push_back({{"kind", "quality"}, {"config", config}, {"policy", policy}, {"metric", metric},
                      {"target_drop_rate", target ? nlohmann::json(*target) : nlohmann::json()}, {"drop_rate_calib", d_calib},
                      {"drop_rate_eval", r.work.drop_rate()}, {"ppl", r.ppl}, {"base_ppl", base_ppl}});
    };
    auto run = [&](convert::dualsparse_options opt) {
      model::weights w = base;
      const auto rep = convert::dualsparse_model(w, data.inputs(), opt);
      return std::pair{rep, model::perplexity(model::transformer(w), data.eval, 512, o.eval_windows)};
    };
    for (const auto& v : variants)
      for (double target : o.drop_rates) {
        convert::dualsparse_options opt;
        opt.policy.kind = v.policy;
        opt.metric = v.metric;
        opt.drop_rate = target;
        const auto [rep, r] = run(opt);
        row(drop_kind_name(v.policy).data(), calib::importance_name(v.metric).data(), target, rep.drop_rate_calib, r);
      }
    {  // NAEE's own rule: β = the median of p2/p1 on the calibration tokens.
      convert::dualsparse_options opt;
      opt.policy.kind = drop_kind::naee;
      const auto [rep, r] = run(opt);
      row("naee", "none", std::nullopt, rep.drop_rate_calib, r);
    }
    // Load-aware thresholds (modelled: this process balances work dynamically;
    // the time of an expert-parallel layer is its most loaded group's work).
    std::printf("\nload-aware thresholds, %s, target drop rate 0.2 (MODELLED layer time = most loaded group's work / "
                "the most loaded group's work without dropping; means over layers)\n",
                config.c_str());
    std::printf("%-6s %3s %10s %10s %10s %8s %8s %8s %8s %10s\n", "policy", "D", "max/mean", "before", "after", "d_before", "d_after",
                "t_before", "t_after", "ppl_after");
    index_t fewest = std::numeric_limits<index_t>::max();  // routed experts of the smallest MoE layer
    for (const auto& l : base.layers)
      if (const auto* m = std::get_if<moe_layer>(&l.ffn)) fewest = std::min(fewest, m->num_experts());
    for (auto policy : {drop_kind::one_t, drop_kind::two_t})
      for (index_t groups : {2, 4, 8}) {
        if (groups > fewest) {
          std::printf("%-6s %3lld   (a layer has only %lld routed experts)\n", drop_kind_name(policy).data(), (long long)groups, (long long)fewest);
          continue;
        }
        convert::dualsparse_options opt;
        opt.policy.kind = policy;
        opt.metric = importance_metric::abs_act;
        opt.drop_rate = 0.2;
        opt.groups = groups;
        const auto [rep, r] = run(opt);
        nlohmann::json g{{"kind", "groups"}, {"config", config}, {"policy", drop_kind_name(policy)}, {"groups", groups},
                         {"target_drop_rate", 0.2}, {"ppl_after", r.ppl}, {"drop_rate_eval_after", r.work.drop_rate()}};
        g["max_over_mean_routed"] = layer_mean(rep, [](const convert::group_loads& x) { return convert::group_loads::imbalance(x.routed); });
        g["max_over_mean_before"] = layer_mean(rep, [](const convert::group_loads& x) { return convert::group_loads::imbalance(x.before); });
        g["max_over_mean_after"] = layer_mean(rep, [](const convert::group_loads& x) { return convert::group_loads::imbalance(x.after); });
        g["drop_rate_before"] = layer_mean(rep, [](const convert::group_loads& x) { return x.drop_rate_before; });
        g["drop_rate_after"] = layer_mean(rep, [](const convert::group_loads& x) { return x.drop_rate_after; });
        g["modelled_time_before"] = layer_mean(rep, [](const convert::group_loads& x) { return x.modelled_time(x.before); });
        g["modelled_time_after"] = layer_mean(rep, [](const convert::group_loads& x) { return x.modelled_time(x.after); });
        std::printf("%-6s %3lld %10.3f %10.3f %10.3f %8.4f %8.4f %8.3f %8.3f %10.4f\n", drop_kind_name(policy).data(), (long long)groups,
                    g["max_over_mean_routed"].get<double>(), g["max_over_mean_before"].get<double>(), g["max_over_mean_after"].get<double>(),
                    g["drop_rate_before"].get<double>(), g["drop_rate_after"].get<double>(), g["modelled_time_before"].get<double>(),
                    g["modelled_time_after"].get<double>(), r.ppl);
        std::fflush(stdout);
        rows.push_back(std::move(g));
      }
  }
  return rows;
}

}  // namespace moeforge::cli::dualsparse_bench
