// Loads an MoE model (e.g. the directory convert_cmoe wrote), gives every MoE
// layer a DualSparse drop policy and compares perplexity and FFN work with and
// without it. Usage: drop_policy MODEL TOKENIZER EVAL_TEXT [THRESHOLD] [EVAL_WINDOWS]
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>

#include <moeforge/io/load.hpp>
#include <moeforge/model/eval.hpp>
#include <moeforge/model/tokenizer.hpp>

#include "arguments.hpp"

int main(int argc, char** argv) try {
  using namespace moeforge;
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s MODEL TOKENIZER EVAL_TEXT [THRESHOLD] [EVAL_WINDOWS]\n", argv[0]);
    return 2;
  }
  const float threshold = argc > 4 ? number_argument<float>(argv[4], "THRESHOLD", 0.0f, 1.0f) : 0.2f;
  const index_t windows = argc > 5 ? number_argument<index_t>(argv[5], "EVAL_WINDOWS", 0, 1 << 30) : 0;
  std::ifstream in(argv[3], std::ios::binary);
  if (!in) throw io_error(std::string("cannot open '") + argv[3] + "'");
  const std::string text(std::istreambuf_iterator<char>(in), {});

  model::weights w = io::load_model(argv[1]);
  const auto tok = model::load_tokenizer(argv[2], w.config.vocab_size);
  const auto stream = tok.encode(text);
  const auto moe_layers = std::count_if(w.layers.begin(), w.layers.end(), [](const model::layer& l) { return std::holds_alternative<moe_layer>(l.ffn); });
  if (moe_layers == 0) throw config_error("drop_policy: the model has no MoE layer (convert it first)");
  const auto before = model::perplexity(model::transformer(w), stream, 512, windows);

  for (auto& l : w.layers)
    if (auto* m = std::get_if<moe_layer>(&l.ffn)) {
      m->router.drop.kind = drop_kind::one_t;  // drop a selected expert whose normalised score is below T
      m->router.drop.threshold = threshold;
    }
  const auto after = model::perplexity(model::transformer(w), stream, 512, windows);

  std::printf("1t threshold %.2f on %lld MoE layers: perplexity %.4f -> %.4f, drop rate %.1f%%, FFN work %.3f -> %.3f of the model's stored FFN\n",
              threshold, static_cast<long long>(moe_layers), before.ppl, after.ppl, 100 * after.work.drop_rate(),
              before.work.active_fraction(), after.work.active_fraction());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
