// This process's memory as the kernel reports it, for benchmarks that show it.
#pragma once

#include <fstream>
#include <string>

namespace moeforge::bench {

/// A /proc/self/status memory field ("VmRSS:" resident, "VmHWM:" peak resident) in MB; 0 where /proc is absent.
inline double status_mb(const std::string& field) {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind(field, 0) == 0) return std::stod(line.substr(field.size())) / 1024.0;
  return 0.0;
}

}  // namespace moeforge::bench
