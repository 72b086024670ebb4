// moeforge-bench: kernel and end-to-end benchmarks (human table, --json rows).
#include "commands.hpp"

namespace moeforge::cli {
// Each benchmark lives in its own bench_<name>.cpp.
int bench_convert(int argc, char** argv);
int bench_cmoe(int argc, char** argv);
int bench_ffn(int argc, char** argv);
}  // namespace moeforge::cli

int main(int argc, char** argv) {
  using namespace moeforge::cli;
  static const command commands[] = {
      {"convert", "CMoE conversion time and memory of one FFN layer", &bench_convert},
      {"cmoe", "CMoE quality table on stories260K", &bench_cmoe},
      {"ffn", "MoE and dense FFN kernels against Eigen and the machine limits", &bench_ffn},
  };
  return dispatch("moeforge-bench", commands, argc, argv);
}
