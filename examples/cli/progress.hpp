// The per-layer progress bar the converting subcommands draw on stderr.
#pragma once

#include <unistd.h>

#include <cstdio>
#include <string>

#include "moeforge/convert/driver.hpp"

namespace moeforge::cli {

/// One line per layer on stderr, redrawn in place on a terminal, with the
/// time left estimated from the layers this run has finished:
///   layer 2/5 [##########..........] assignment    1.3 s  ETA 4.0 s
class progress_bar {
 public:
  explicit progress_bar(bool quiet) : quiet_(quiet), tty_(::isatty(STDERR_FILENO) != 0) {}

  void operator()(const convert::layer_progress& p) {
    if (quiet_) return;
    const bool done = p.stage == "done";
    if (first_ < 0) first_ = p.layer;  // a resumed run starts past layer 0
    if (done) eta_ = p.seconds / double(p.layer + 1 - first_) * double(p.layers - p.layer - 1);
    if (!tty_ && !done) return;
    const int width = 20;
    const int filled = int(double(p.layer + (done ? 1 : 0)) / double(p.layers) * width + 0.5);
    const std::string eta = eta_ < 0 ? "" : "  ETA " + std::to_string(int(eta_ + 0.5)) + " s";
    std::fprintf(stderr, "%slayer %lld/%lld [%s%s] %-12s %6.1f s%s%s", tty_ ? "\r" : "", (long long)p.layer + 1, (long long)p.layers,
                 std::string(std::size_t(filled), '#').c_str(), std::string(std::size_t(width - filled), '.').c_str(),
                 p.stage.c_str(), p.seconds, eta.c_str(), tty_ && !done ? "\x1b[K" : "\n");
    std::fflush(stderr);
  }

 private:
  bool quiet_, tty_;
  index_t first_ = -1;
  double eta_ = -1;
};

}  // namespace moeforge::cli
