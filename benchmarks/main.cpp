// moeforge-bench: kernel and end-to-end benchmarks (human table, --json rows).
#include <cstring>
#include <iostream>

#include "args.hpp"
#include "../examples/cli/commands.hpp"
#include "moeforge/core/error.hpp"

namespace moeforge::cli {
// Each subcommand is defined in its own cmd_<name>.cpp.
int bench_convert(int argc, char** argv);
int bench_cmoe(int argc, char** argv);
}  // namespace moeforge::cli

namespace {

using moeforge::cli::command;

const command commands[] = {
    {"convert", "CMoE conversion time and memory of one FFN layer", &moeforge::cli::bench_convert},
    {"cmoe", "CMoE quality table on stories260K", &moeforge::cli::bench_cmoe},
    {"version", "print the version", [](int, char**) {
       std::cout << "moeforge 0.1.0\n";
       return 0;
     }},
};

void print_usage(std::ostream& out) {
  out << "usage: moeforge-bench <benchmark> [options]\n\ncommands:\n";
  for (const auto& c : commands) out << "  " << c.name << std::string(12 - std::strlen(c.name), ' ') << c.summary << "\n";
  out << "\n'moeforge-bench <benchmark> --help' describes its options.\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    print_usage(argc < 2 ? std::cerr : std::cout);
    return argc < 2 ? 2 : 0;
  }
  for (const auto& c : commands) {
    if (std::strcmp(argv[1], c.name) != 0) continue;
    try {
      return c.run(argc - 1, argv + 1);
    } catch (const moeforge::cli::usage_error& e) {
      std::cerr << "moeforge-bench " << e.what() << "\n";
      return 2;
    } catch (const moeforge::error& e) {
      std::cerr << e.what() << "\n";
      return 1;
    }
  }
  std::cerr << "moeforge-bench: unknown benchmark '" << argv[1] << "'\n\n";
  print_usage(std::cerr);
  return 2;
}
