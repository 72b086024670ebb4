// Subcommand dispatch shared by the moeforge tool and moeforge-bench: each
// subcommand is a function taking its own argv (argv[0] = its name) and
// returning the exit code; usage errors exit 2, moeforge errors exit 1.
// `--version` prints the CMake project version (MOEFORGE_VERSION, defined for
// moeforge's own executables).
#pragma once

#include <cstring>
#include <iostream>
#include <string>

#include "args.hpp"
#include "moeforge/core/error.hpp"

namespace moeforge::cli {

/// Called with the reason before a command's error is reported. A job of
/// several processes (--expert-parallel) sets it to end them all: the others
/// would wait forever in a collective this process never reaches.
inline void (*on_command_error)(const std::string& reason) = nullptr;

struct command {
  const char* name;
  const char* summary;
  int (*run)(int argc, char** argv);
};

template <std::size_t N>
int dispatch(const char* program, const command (&commands)[N], int argc, char** argv) {
  auto usage = [&](std::ostream& out) {
    out << "usage: " << program << " <command> [options]\n\ncommands:\n";
    for (const auto& c : commands) {
      std::string name = c.name;
      name.resize(std::max<std::size_t>(name.size() + 2, 12), ' ');
      out << "  " << name << c.summary << "\n";
    }
    out << "\n'" << program << " <command> --help' describes a command's options; '" << program << " --version' prints the version.\n";
  };
  if (argc == 2 && !std::strcmp(argv[1], "--version")) {
    std::cout << program << " " << MOEFORGE_VERSION << "\n";
    return 0;
  }
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    usage(argc < 2 ? std::cerr : std::cout);
    return argc < 2 ? 2 : 0;
  }
  for (const auto& c : commands) {
    if (std::strcmp(argv[1], c.name) != 0) continue;
    try {
      return c.run(argc - 1, argv + 1);
    } catch (const usage_error& e) {
      if (on_command_error) on_command_error(e.what());
      std::cerr << e.what() << "\n";
      return 2;
    } catch (const moeforge::error& e) {
      if (on_command_error) on_command_error(e.what());
      std::cerr << e.what() << "\n";
      return 1;
    } catch (const std::exception& e) {
      if (on_command_error) on_command_error(e.what());
      throw;
    }
  }
  std::cerr << program << ": unknown command '" << argv[1] << "'\n\n";
  usage(std::cerr);
  return 2;
}

}  // namespace moeforge::cli
