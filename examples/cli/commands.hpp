// The subcommands of the moeforge tool; each lives in cmd_<name>.cpp and
// returns the process exit code.
#pragma once

namespace moeforge::cli {

struct command {
  const char* name;
  const char* summary;
  int (*run)(int argc, char** argv);  // argv[0] is the subcommand name
};

}  // namespace moeforge::cli
