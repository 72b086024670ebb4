// How the standalone examples read a numeric command-line argument: all of
// it a number within [min, max], else a config_error naming the argument.
#pragma once

#include <string>
#include <type_traits>

#include <moeforge/core/error.hpp>

template <class T>
T number_argument(const char* text, const char* name, T min, T max) {
  std::size_t end = 0;
  T value{};
  try {
    if constexpr (std::is_floating_point_v<T>)
      value = T(std::stod(text, &end));
    else
      value = T(std::stoll(text, &end));
  } catch (const std::exception&) {
    end = 0;  // not a number, or out of the type's range
  }
  if (end == 0 || text[end] != '\0' || !(value >= min && value <= max))
    throw moeforge::config_error(std::string(name) + " must be a number in [" + std::to_string(min) + ", " + std::to_string(max) + "], got '" + text + "'");
  return value;
}
