// moeforge-bench pipeline: the methods composed on stories260K — dense, CMoE,
// then DualSparse-MoE dropping, then MoNE pruning — one row per stage and per
// useful combination: perplexity, the FFN work actually done, parameters,
// and decode and prefill speed, all measured in this run.
#include <cstdio>
#include <fstream>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "json_out.hpp"
#include "options.hpp"
#include "moeforge/convert/dualsparse.hpp"
#include "moeforge/convert/mone.hpp"
#include "stories.hpp"

namespace moeforge::cli {

int bench_pipeline(int argc, char** argv) {
  args a("moeforge-bench pipeline",
         "The methods composed on stories260K: dense -> CMoE -> DualSparse-MoE dropping (2t, importance b, calibrated to\n"
         "--drop-rate) -> MoNE pruning (--prune-ratio of each layer's experts replaced by novices). Per row: perplexity on\n"
         "tinystories_eval.txt (ctx 512), the FFN work computed on that text relative to the dense model's, parameters,\n"
         "and single-stream decode and prefill (the model's full context of 512 tokens) tokens/s measured in this run. stories260K is tiny (dim 64): its speed is mostly attention, norms and\n"
         "per-call overhead, so the speed columns understate what dropping and pruning save on large layers; see\n"
         "`moeforge-bench dualsparse` for the kernel speedups on a Mixtral-shaped layer.");
  bench::add_stories_options(a);
  a.option("configs", "LIST", "CMoE configurations ('' for the dense row alone)", "S2A4E8,S1A3E8")
      .option("drop-rate", "D", "DualSparse target drop rate, in [0, 1)", "0.2")
      .option("prune-ratio", "R", "MoNE pruning ratio, in [0, 1)", "0.25");
  if (!a.parse(argc, argv)) return 0;
  const bench::json_output json = bench::json_option(a);
  const auto configs = a.get("configs").empty() ? std::vector<std::string>() : bench::cmoe_config_list(a, "configs");
  const double drop_rate = a.get_parsed("drop-rate", bench::parse_fraction), prune_ratio = a.get_parsed("prune-ratio", bench::parse_fraction);
  const auto counts = bench::read_stories_counts(a);
  const index_t windows = counts.eval_windows, steps = counts.decode_steps;
  const bench::stories data = bench::load_stories(a.get("data"), counts.calib_tokens);

  nlohmann::json rows = nlohmann::json::array();
  std::printf("stories260K, %lld calibration tokens, tinystories eval ctx 512\n", (long long)counts.calib_tokens);
  std::printf("%-40s %10s %9s %9s %10s %12s %13s\n", "model", "ppl", "ppl/dense", "FFN work", "params", "decode tok/s", "prefill tok/s");
  double dense_ppl = 0, dense_work = 0;
  auto measure = [&](const std::string& name, const model::weights& w) {
    const model::transformer tr(w);
    const auto r = model::perplexity(tr, data.eval, 512, windows);
    const double decode = model::decode_tokens_per_second(tr, steps);
    const double prefill = model::prefill_tokens_per_second(tr, w.config.seq_len);
    // The FFN work computed on the evaluation text relative to the dense
    // model's: comparable across rows (the share of a pruned model's own
    // stored experts would grow as experts are removed).
    const double work = r.work.shared + r.work.kept;
    if (dense_ppl == 0) dense_ppl = r.ppl, dense_work = work;
    std::printf("%-40s %10.4f %9.3f %9.3f %10lld %12.0f %13.0f\n", name.c_str(), r.ppl, r.ppl / dense_ppl, work / dense_work,
                (long long)model::parameter_count(w), decode, prefill);
    std::fflush(stdout);
    rows.push_back({{"model", name}, {"ppl", r.ppl}, {"dense_ppl", dense_ppl}, {"ffn_work_vs_dense", work / dense_work}, {"active_fraction", r.work.active_fraction()},
                    {"drop_rate", r.work.drop_rate()}, {"params", model::parameter_count(w)}, {"decode_tok_s", decode},
                    {"prefill_tok_s", prefill}});
  };
  auto sparsify = [&](model::weights w) {
    convert::dualsparse_options o;
    o.metric = calib::importance_metric::abs_act;
    o.policy.kind = drop_kind::two_t;
    o.drop_rate = drop_rate;
    convert::dualsparse_model(w, data.inputs(), o);
    return w;
  };
  auto prune = [&](model::weights w) {
    convert::mone_options o;
    o.ratio = prune_ratio;
    convert::mone_model(w, data.inputs(), o);
    return w;
  };
  measure("dense", data.dense);
  for (const auto& config : configs) {
    const model::weights cmoe = bench::cmoe_model(data, config);
    const std::string drop = " + 2t drop " + a.get("drop-rate"), mone = " + MoNE " + a.get("prune-ratio");
    measure("CMoE " + config, cmoe);
    const model::weights dropped = sparsify(cmoe);
    measure("CMoE " + config + drop, dropped);
    measure("CMoE " + config + mone, prune(cmoe));
    measure("CMoE " + config + drop + mone, prune(dropped));
  }
  json.write(rows);
  return 0;
}

}  // namespace moeforge::cli
