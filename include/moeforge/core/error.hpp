// Typed errors: every failure on user input is one of these, with a message
// that names the file, tensor, field or option and what was expected.
#pragma once

#include <exception>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace moeforge {

/// Base of every exception moeforge throws. Messages start with "moeforge: ".
class error : public std::runtime_error {
 public:
  explicit error(const std::string& what) : std::runtime_error("moeforge: " + what) {}
};

/// A file or buffer is not what its format says it must be (truncated, bad
/// header, missing tensor, unsupported dtype).
class format_error : public error {
 public:
  using error::error;
};

/// Tensor or batch shapes that do not fit together.
class shape_error : public error {
 public:
  using error::error;
};

/// An impossible or contradictory option or configuration (k > experts, ...).
class config_error : public error {
 public:
  using error::error;
};

/// A value that cannot be computed with: NaN or Inf in an input or weight.
class value_error : public error {
 public:
  using error::error;
};

/// The file system refused: cannot open, read, write or rename.
class io_error : public error {
 public:
  using error::error;
};

namespace detail {

/// Concatenates its arguments with operator<< into one string.
template <class... Args>
std::string cat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
}

/// What `e` says without the "moeforge: " our errors start with, for a
/// message that wraps it (naming the file it came from).
inline std::string reason(const std::exception& e) {
  const std::string what = e.what(), prefix = "moeforge: ";
  return what.compare(0, prefix.size(), prefix) == 0 ? what.substr(prefix.size()) : what;
}

/// Throws what `failure` holds again as the same moeforge error type, its
/// message after `context` (any other exception becomes a moeforge::error),
/// so a caller can still catch a wrapped failure by its type.
[[noreturn]] inline void rethrow_in_context(const std::exception_ptr& failure, const std::string& context) {
  try {
    std::rethrow_exception(failure);
  } catch (const format_error& e) {
    throw format_error(context + reason(e));
  } catch (const shape_error& e) {
    throw shape_error(context + reason(e));
  } catch (const config_error& e) {
    throw config_error(context + reason(e));
  } catch (const value_error& e) {
    throw value_error(context + reason(e));
  } catch (const io_error& e) {
    throw io_error(context + reason(e));
  } catch (const std::exception& e) {
    throw error(context + reason(e));
  }
}

}  // namespace detail
}  // namespace moeforge
