// moeforge eval: perplexity of a text (the CMoE paper's protocol) and speed.
#include <cmath>
#include <cstdio>
#include <iostream>
#include <optional>

#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "model_args.hpp"
#include "moeforge/model/eval.hpp"

namespace moeforge::cli {

namespace {

/// --policy/--threshold/--margin: the drop policy that replaces every MoE layer's (load-aware factors included).
std::optional<drop_policy> requested_policy(const args& a) {
  if (!a.has("policy")) {
    for (const char* option : {"threshold", "margin"})
      if (a.given(option)) throw usage_error(std::string("moeforge eval: --") + option + " needs --policy");
    return std::nullopt;
  }
  drop_policy p;
  p.kind = a.get_parsed("policy", [](const std::string& v) { return parse_drop_kind(v); });
  p.threshold = a.get_float("threshold", [](float v) { return v >= 0 && v <= 1; }, "in [0, 1]");
  p.margin = a.get_float("margin", [](float v) { return std::isfinite(v) && v >= 0; }, "finite and at least 0");
  return p;
}

}  // namespace

int run_eval(int argc, char** argv) {
  args a("moeforge eval",
         "Perplexity of a text: one BOS-prefixed token stream cut into consecutive windows of --ctx tokens,\n"
         "each evaluated from an empty cache. Speed, comparable with other engines: prefill = one stream of\n"
         "--prefill-tokens tokens in one forward pass from an empty cache (best of 3 after a warm-up); decode =\n"
         "one-token steps from BOS after two warm-up steps; throughput = the evaluation's tokens/s with windows\n"
         "run side by side, one per thread.");
  add_model_options(a, true);
  add_dtype_option(a);
  a.required("text", "FILE", "the text to evaluate");
  a.option("ctx", "N", "window length (default: the model's context)");
  a.option("windows", "N", "evaluate only the first N windows");
  a.option("decode-steps", "N", "tokens to time one-token decode over (at most the model's context less the 2 warm-up steps)", "256");
  a.option("prefill-tokens", "N", "tokens of the timed single-stream prefill (default: min(512, the model's context))");
  a.option("policy", "none|1t|2t|naee|top-p", "override every MoE layer's stored drop policy (the model file is not changed)");
  a.option("threshold", "T", "with --policy: its threshold in [0, 1]", "0");
  a.option("margin", "M", "with --policy 2t: T_major = T - M, T_minor = T + M", "0.01");
  a.flag("json", "print one JSON object instead of text");
  if (!a.parse(argc, argv)) return 0;
  const auto type = requested_dtype(a);
  const std::optional<drop_policy> policy = requested_policy(a);
  // Every option checked before the model loads; those bounded by the
  // model's context again once it has.
  const index_t ctx = a.has("ctx") ? a.get_int("ctx", 2) : 0, windows = a.has("windows") ? a.get_int("windows", 1) : 0;
  const index_t decode_steps = a.get_int("decode-steps", 1);
  const std::optional<index_t> wanted_prefill = a.has("prefill-tokens") ? std::optional<index_t>(a.get_int("prefill-tokens", 1)) : std::nullopt;
  bool any_moe = false;
  const auto set_policy = [&](index_t li, model::layer& l) {
    auto* m = std::get_if<moe_layer>(&l.ffn);
    if (!m) return;
    validate(*policy, m->num_experts(), detail::cat("--policy on layer ", li));
    m->router.drop = *policy;
    any_moe = true;
  };
  // Owning: it runs on prepared layouts of --dtype weights, read layer by
  // layer (a packed directory's mapped, unless --policy edits the layers).
  const std::string tokenizer = tokenizer_path(a);
  const model::transformer tr = load_transformer(a, policy ? std::function<void(index_t, model::layer&)>(set_policy) : nullptr);
  if (policy && !any_moe) throw config_error("eval: --policy needs a model with MoE layers (convert it first with `moeforge convert cmoe`)");
  const auto& c = tr.config();
  const auto tok = model::load_tokenizer(tokenizer, c.vocab_size);
  const index_t prefill_tokens = wanted_prefill.value_or(std::min<index_t>(512, c.seq_len));
  if (prefill_tokens > c.seq_len)
    throw usage_error(detail::cat("moeforge eval: --prefill-tokens must be in 1..", c.seq_len, " (the model's context), got ", prefill_tokens));
  if (ctx > c.seq_len) throw usage_error(detail::cat("moeforge eval: --ctx must be in 2..", c.seq_len, " (the model's context), got ", ctx));
  const double nominal_active = model::active_ffn_fraction(tr.structure());
  const dtype weights_as = type.value_or(tr.structure().run_dtype());
  const auto stream = tok.encode(read_text_file(a.get("text")));
  if (stream.size() < 2)
    throw config_error(detail::cat("eval: --text ", a.get("text"), " is ", stream.size(), " token(s) with BOS; a perplexity needs at least 2"));
  const auto r = model::perplexity(tr, stream, ctx, windows);
  const double decode = model::decode_tokens_per_second(tr, decode_steps);
  const double prefill = model::prefill_tokens_per_second(tr, prefill_tokens);
  if (a.flag_set("json")) {
    nlohmann::json j{{"ppl", r.ppl},
                     {"nll", r.nll},
                     {"tokens", r.tokens},
                     {"predicted", r.predicted},
                     {"windows", r.windows},
                     {"active_fraction", r.work.active_fraction()},
                     {"nominal_active_fraction", nominal_active},
                     {"dtype", dtype_name(weights_as)},
                     {"drop_rate", r.work.drop_rate()},
                     {"layer_drop_rate", nlohmann::json::array()},
                     {"seconds", r.seconds},
                     {"prefill_tokens", prefill_tokens},
                     {"prefill_tok_s", prefill},
                     {"throughput_tok_s", r.throughput_tokens_per_second},
                     {"decode_tok_s", decode}};
    for (const auto& l : r.layer_work) j["layer_drop_rate"].push_back(l.drop_rate());
    std::cout << j.dump() << "\n";
  } else {
    std::printf("perplexity   %.6f\ntokens       %lld (predicted %lld, windows %lld)\n"
                "active FFN   %.1f%% of its work per token on this text (%.1f%% by configuration)\ndrop rate    %.2f%% of the token-expert work\n"
                "prefill      %.0f tok/s (one stream of %lld tokens)\ndecode       %.0f tok/s (one stream)\n"
                "throughput   %.0f tok/s (evaluation windows side by side)\nweights      %s\n",
                r.ppl, (long long)r.tokens, (long long)r.predicted, (long long)r.windows, 100 * r.work.active_fraction(),
                100 * nominal_active, 100 * r.work.drop_rate(), prefill, (long long)prefill_tokens, decode,
                r.throughput_tokens_per_second, std::string(dtype_name(weights_as)).c_str());
  }
  return 0;
}

}  // namespace moeforge::cli
