// moeforge: convert, evaluate and run models from the command line.
#include "commands.hpp"

namespace moeforge::cli {
// Each subcommand lives in its own cmd_<name>.cpp.
int run_generate(int argc, char** argv);
int run_eval(int argc, char** argv);
int run_logits(int argc, char** argv);
int run_convert(int argc, char** argv);
int run_export(int argc, char** argv);
int run_sparsify(int argc, char** argv);
int run_prune(int argc, char** argv);
}  // namespace moeforge::cli

int main(int argc, char** argv) {
  using namespace moeforge::cli;
  static const command commands[] = {
      {"generate", "generate text (greedy or sampled)", &run_generate},
      {"eval", "perplexity of a text and tokens/s", &run_eval},
      {"logits", "logits at every position of a token sequence", &run_logits},
      {"convert", "convert a dense model into a mixture of experts (convert cmoe --help)", &run_convert},
      {"sparsify", "DualSparse-MoE partition and dropping on an MoE model (sparsify dualsparse --help)", &run_sparsify},
      {"prune", "prune experts of an MoE model, MoNE and its baselines (prune mone --help)", &run_prune},
      {"export", "write a model as a Hugging Face or moeforge native directory", &run_export},
  };
  return dispatch("moeforge", commands, argc, argv);
}
