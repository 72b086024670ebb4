// This process's memory as the kernel reports it, for benchmarks that show it.
#pragma once

#include <fstream>
#include <string>

namespace moeforge::bench {

/// A kB field of a /proc file in MB; 0 where /proc is absent.
inline double proc_field_mb(const char* file, const std::string& field) {
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);)
    if (line.rfind(field, 0) == 0) return std::stod(line.substr(field.size())) / 1024.0;
  return 0.0;
}

/// A /proc/self/status memory field ("VmRSS:" resident, "VmHWM:" peak resident) in MB; 0 where /proc is absent.
inline double status_mb(const std::string& field) { return proc_field_mb("/proc/self/status", field); }

/// Memory the kernel could give this process without swapping, in MB (/proc/meminfo's MemAvailable); 0 where /proc is absent.
inline double available_mb() { return proc_field_mb("/proc/meminfo", "MemAvailable:"); }

/// Resets the kernel's peak-RSS mark (VmHWM) to the current RSS, so that a
/// later measurement in the same process gets its own peak; false where the
/// kernel does not allow it (the later peak then includes the earlier one).
inline bool reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
  f.close();
  return bool(f);
}

}  // namespace moeforge::bench
