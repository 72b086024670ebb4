// The per-layer progress bar the converting subcommands draw on stderr.
#pragma once

#include <unistd.h>

#include <cstdio>
#include <string>

#include "moeforge/convert/driver.hpp"

namespace moeforge::cli {

/// One line per layer on stderr, redrawn in place on a terminal:
///   layer 2/5 [##########..........] assignment  1.3 s
class progress_bar {
 public:
  explicit progress_bar(bool quiet) : quiet_(quiet), tty_(::isatty(STDERR_FILENO) != 0) {}

  void operator()(const convert::layer_progress& p) {
    if (quiet_) return;
    const bool done = p.stage == "done";
    if (!tty_ && !done) return;
    const int width = 20;
    const int filled = int(double(p.layer + (done ? 1 : 0)) / double(p.layers) * width + 0.5);
    std::fprintf(stderr, "%slayer %lld/%lld [%s%s] %-12s %6.1f s%s", tty_ ? "\r" : "", (long long)p.layer + 1, (long long)p.layers,
                 std::string(std::size_t(filled), '#').c_str(), std::string(std::size_t(width - filled), '.').c_str(),
                 p.stage.c_str(), p.seconds, tty_ && !done ? "" : "\n");
    std::fflush(stderr);
  }

 private:
  bool quiet_, tty_;
};

}  // namespace moeforge::cli
