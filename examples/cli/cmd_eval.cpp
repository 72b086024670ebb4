// moeforge eval: perplexity of a text (the CMoE paper's protocol) and speed.
#include <cstdio>
#include <iostream>

#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "model_args.hpp"
#include "moeforge/model/eval.hpp"

namespace moeforge::cli {

int run_eval(int argc, char** argv) {
  args a("moeforge eval",
         "Perplexity of a text: one BOS-prefixed token stream cut into consecutive windows of --ctx tokens,\n"
         "each evaluated from an empty cache; also prefill and decode tokens/s.");
  add_model_options(a, true);
  a.required("text", "FILE", "the text to evaluate");
  a.option("ctx", "N", "window length (default: the model's context)");
  a.option("windows", "N", "evaluate only the first N windows");
  a.option("decode-steps", "N", "tokens to time one-token decode over", "256");
  a.flag("json", "print one JSON object instead of text");
  if (!a.parse(argc, argv)) return 0;
  const auto w = load_model(a);
  const auto tok = load_tokenizer(a, w);
  const model::transformer tr(w);
  const auto stream = tok.encode(read_text_file(a.get("text")));
  const auto r = model::perplexity(tr, stream, a.has("ctx") ? a.get_int("ctx") : 0, a.has("windows") ? a.get_int("windows") : 0);
  const double decode = model::decode_tokens_per_second(tr, a.get_int("decode-steps"));
  if (a.flag_set("json")) {
    nlohmann::json j{{"ppl", r.ppl}, {"nll", r.nll}, {"tokens", r.tokens}, {"predicted", r.predicted}, {"windows", r.windows}, {"active_fraction", model::active_ffn_fraction(w)},
                     {"seconds", r.seconds}, {"prefill_tok_s", r.prefill_tokens_per_second}, {"decode_tok_s", decode}};
    std::cout << j.dump() << "\n";
  } else {
    std::printf("perplexity   %.6f\ntokens       %lld (predicted %lld, windows %lld)\nactive FFN   %.1f%% of its neurons per token\n"
                "prefill      %.0f tok/s\ndecode       %.0f tok/s\n",
                r.ppl, (long long)r.tokens, (long long)r.predicted, (long long)r.windows, 100 * model::active_ffn_fraction(w),
                r.prefill_tokens_per_second, decode);
  }
  return 0;
}

}  // namespace moeforge::cli
