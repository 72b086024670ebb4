// moeforge generate: greedy or sampled text from a model.
#include <cmath>
#include <iostream>

#include "commands.hpp"
#include "model_args.hpp"
#include "moeforge/model/sampling.hpp"

namespace moeforge::cli {

int run_generate(int argc, char** argv) {
  args a("moeforge generate", "Generate text from a model, starting at BOS (and the prompt, if given).");
  add_model_options(a, true);
  add_dtype_option(a);
  a.option("prompt", "TEXT", "text to continue", "");
  a.option("steps", "N", "positions to fill, BOS and prompt included (at most the model's context)", "256");
  a.option("temperature", "T", "0 = greedy", "0");
  a.option("top-p", "P", "nucleus sampling threshold", "0.9");
  a.option("seed", "N", "random seed for sampling", "42");
  a.flag("tokens", "also print the token ids on stderr");
  if (!a.parse(argc, argv)) return 0;
  // Every option is checked before the model loads: a bad value is a usage error naming it.
  model::sampling_options o;
  o.temperature = a.get_float("temperature", [](float t) { return t >= 0 && std::isfinite(t); }, "a finite number >= 0");
  o.top_p = a.get_float("top-p", [](float p) { return p > 0 && p <= 1; }, "in (0, 1]");
  o.seed = std::uint64_t(a.get_int("seed", 0));
  const index_t steps = a.get_int("steps", 1);
  const std::string tokenizer = tokenizer_path(a);
  const model::transformer tr = load_transformer(a);  // owning: it runs on prepared layouts of --dtype weights, read layer by layer
  const auto tok = model::load_tokenizer(tokenizer, tr.config().vocab_size);
  const auto prompt = tok.encode(a.get("prompt"));
  const index_t positions = std::min<index_t>(steps, tr.config().seq_len);
  if (index_t(prompt.size()) > positions)
    throw usage_error(detail::cat("moeforge generate: --prompt is ", prompt.size(), " tokens with BOS, more than the ", positions, " positions ",
                                  positions < steps ? "of the model's context" : "--steps allows"));
  const auto out = model::generate(tr, prompt, steps, o);
  std::cout << tok.decode(out) << "\n";
  if (a.flag_set("tokens")) {
    for (auto id : out) std::cerr << id << ' ';
    std::cerr << "\n";
  }
  return 0;
}

}  // namespace moeforge::cli
