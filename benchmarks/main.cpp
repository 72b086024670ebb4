// moeforge-bench: kernel and end-to-end benchmarks (human table, --json rows).
#include "commands.hpp"

namespace moeforge::cli {
// Each benchmark lives in its own bench_<name>.cpp.
int bench_convert(int argc, char** argv);
int bench_cmoe(int argc, char** argv);
int bench_mone(int argc, char** argv);
int bench_ffn(int argc, char** argv);
int bench_dualsparse(int argc, char** argv);
int bench_pipeline(int argc, char** argv);
int bench_model(int argc, char** argv);
int bench_make_model(int argc, char** argv);
int bench_convert_model(int argc, char** argv);
int bench_ep(int argc, char** argv);
}  // namespace moeforge::cli

int main(int argc, char** argv) {
  using namespace moeforge::cli;
  static const command commands[] = {
      {"convert", "CMoE conversion time and memory of one FFN layer", &bench_convert},
      {"cmoe", "CMoE quality table on stories260K", &bench_cmoe},
      {"mone", "MoNE and expert-pruning baselines on stories260K converted by CMoE", &bench_mone},
      {"ffn", "MoE and dense FFN kernels against Eigen and the machine limits", &bench_ffn},
      {"dualsparse", "DualSparse-MoE dropping: measured kernel speedup at each drop rate", &bench_dualsparse},
      {"model", "whole-model prefill and decode speed, dense beside CMoE layouts, against the machine's bandwidth", &bench_model},
      {"make-model", "a seeded random-weight Hugging Face checkpoint of a published shape, written tensor by tensor", &bench_make_model},
      {"convert-model", "streamed CMoE conversion of a synthetic checkpoint: time and peak memory per depth", &bench_convert_model},
      {"ep", "expert parallelism over MPI (under mpirun): tokens/s, bytes sent, communication share, per-rank load", &bench_ep},
      {"pipeline", "dense -> CMoE -> DualSparse -> MoNE on stories260K: quality, work, size and speed", &bench_pipeline},
  };
  return dispatch("moeforge-bench", commands, argc, argv);
}
