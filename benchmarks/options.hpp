// Value parsers several benchmarks' options share, for args::get_parsed and
// args::get_list: each takes the whole text or throws config_error saying what
// it expected, which the parser turns into a usage error naming the option.
#pragma once

#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <string>

#include "moeforge/core/error.hpp"
#include "moeforge/core/tensor.hpp"

namespace moeforge::bench {

/// The most tokens a kernel call of `ffn` or `dualsparse` takes: a call's
/// activations (a few matrices of tokens x 2048 floats) then stay within a
/// few GB, where a mistyped count would otherwise end in bad_alloc.
inline constexpr long long max_call_tokens = 1 << 16;

/// A token count per call: a positive integer up to max_call_tokens.
inline index_t parse_token_count(const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || end != text.c_str() + text.size() || errno == ERANGE || v < 1 || v > max_call_tokens)
    throw config_error("'" + text + "' is not a token count (1 to " + std::to_string(max_call_tokens) + ")");
  return index_t(v);
}

/// A number in [0, 1): a target drop rate, a pruning ratio.
inline double parse_fraction(const std::string& text) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || end != text.c_str() + text.size() || !(v >= 0 && v < 1))
    throw config_error("'" + text + "' is not a number in [0, 1)");
  return v;
}

/// The machine's physical memory in bytes (0 where unknown): no layer or
/// model a benchmark builds can be larger.
inline double physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), size = ::sysconf(_SC_PAGE_SIZE);
  return pages > 0 && size > 0 ? double(pages) * double(size) : 0.0;
}

}  // namespace moeforge::bench
