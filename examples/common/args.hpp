// A small command-line parser shared by the moeforge tool and moeforge-bench:
// `--name value` options, `--flag` switches, `--help`, clear usage errors.
// Values are checked where they are read (get_int(name, min), get_double(name,
// ok, expected)), so each command checks every option before it loads or
// writes anything. Decided (issue 15): move to CLI11 (Debian's libcli11-dev)
// once the subcommands stop changing, for validators declared with each option
// and one help format; until then this parser stays, and the CLI tests
// (tests/test_cli.cpp) pin the behaviour any replacement must keep: exit 2
// naming the option for a bad command line, 1 for a bad file or model.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "moeforge/core/error.hpp"

namespace moeforge::cli {

/// Thrown for a command line that does not parse; the tool prints it with the usage.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Runs `check`, a library check of options the command line set: what it
/// refuses is a bad command line (exit 2), named after `command`.
template <class Check>
void refuse_as_usage(const std::string& command, Check&& check) {
  try {
    check();
  } catch (const std::exception& e) {
    throw usage_error(command + ": " + moeforge::detail::reason(e));
  }
}

class args {
 public:
  args(std::string command, std::string summary) : command_(std::move(command)), summary_(std::move(summary)) {}

  /// An option that takes a value; `fallback` empty and `required` false means optional without default.
  args& option(const std::string& name, const std::string& value_name, const std::string& help,
               std::optional<std::string> fallback = std::nullopt, bool required = false) {
    specs_.push_back({name, value_name, help, std::move(fallback), required, false});
    return *this;
  }
  args& required(const std::string& name, const std::string& value_name, const std::string& help) {
    return option(name, value_name, help, std::nullopt, true);
  }
  args& flag(const std::string& name, const std::string& help) {
    specs_.push_back({name, "", help, std::nullopt, false, true});
    return *this;
  }

  /// Parses argv[first..argc); returns false when --help was printed.
  bool parse(int argc, char** argv, int first = 1) {
    for (int i = first; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--help" || a == "-h") {
        print_help(std::cout);
        return false;
      }
      if (a.rfind("--", 0) != 0) throw usage_error(command_ + ": unexpected argument '" + a + "'");
      std::string name = a.substr(2);
      std::optional<std::string> inline_value;
      if (const auto eq = name.find('='); eq != std::string::npos) {
        inline_value = name.substr(eq + 1);
        name = name.substr(0, eq);
      }
      const spec* s = find(name);
      if (!s) throw usage_error(command_ + ": unknown option --" + name + " (see --help)");
      if (s->is_flag) {
        if (inline_value) throw usage_error(command_ + ": --" + name + " takes no value");
        values_[name] = "1";
      } else if (inline_value) {
        values_[name] = *inline_value;
      } else {
        if (i + 1 >= argc) throw usage_error(command_ + ": --" + name + " needs a value <" + s->value_name + ">");
        values_[name] = argv[++i];
      }
    }
    for (const auto& s : specs_)
      if (s.required && !values_.count(s.name)) throw usage_error(command_ + ": --" + s.name + " is required (see --help)");
    return true;
  }

  bool has(const std::string& name) const { return values_.count(name) || (find(name) && find(name)->fallback); }
  bool flag_set(const std::string& name) const { return given(name); }
  /// Whether the command line gave the option (its default aside).
  bool given(const std::string& name) const { return values_.count(name) != 0; }

  std::string get(const std::string& name) const {
    if (auto it = values_.find(name); it != values_.end()) return it->second;
    const spec* s = find(name);
    if (s && s->fallback) return *s->fallback;
    throw usage_error(command_ + ": --" + name + " is required here");
  }
  long long get_int(const std::string& name) const { return parse_number<long long>(name, [](const std::string& v, std::size_t* end) { return std::stoll(v, end); }); }
  double get_double(const std::string& name) const { return parse_number<double>(name, [](const std::string& v, std::size_t* end) { return std::stod(v, end); }); }
  /// An integer option that must be at least `min`: a count, a size, a seed.
  long long get_int(const std::string& name, long long min) const {
    const long long v = get_int(name);
    if (v < min) throw usage_error(command_ + ": --" + name + " must be at least " + std::to_string(min) + ", got " + get(name));
    return v;
  }
  /// ... and at most `max` (a value that must fit a narrower type).
  long long get_int(const std::string& name, long long min, long long max) const {
    const long long v = get_int(name, min);
    if (v > max) throw usage_error(command_ + ": --" + name + " must be at most " + std::to_string(max) + ", got " + get(name));
    return v;
  }
  /// An option parsed by one of the library's parsers (parse_drop_kind,
  /// parse_cmoe_config, ...): the error it throws becomes a usage error naming
  /// the option.
  template <class Parse>
  auto get_parsed(const std::string& name, Parse parse) const {
    const std::string v = get(name);
    try {
      return parse(v);
    } catch (const std::exception& e) {
      throw usage_error(command_ + ": --" + name + ": " + moeforge::detail::reason(e));
    }
  }
  /// A comma-separated list option, each item parsed as by get_parsed; an
  /// empty list is a usage error (`expected` says what it takes).
  template <class Parse>
  auto get_list(const std::string& name, Parse parse, const std::string& expected) const {
    std::vector<decltype(parse(std::string()))> items;
    const std::string v = get(name);
    for (std::size_t begin = 0; begin <= v.size();) {
      const std::size_t end = std::min(v.find(',', begin), v.size());
      if (end > begin) items.push_back(get_parsed(name, [&](const std::string&) { return parse(v.substr(begin, end - begin)); }));
      begin = end + 1;
    }
    if (items.empty()) throw usage_error(command_ + ": --" + name + " needs at least one of " + expected);
    return items;
  }
  /// A number option that must satisfy `ok` (NaN and Inf parse, so `ok` decides
  /// on them too); `expected` says what it takes, for the message.
  template <class Ok>
  double get_double(const std::string& name, Ok ok, const std::string& expected) const {
    const double v = get_double(name);
    if (!ok(v)) throw usage_error(command_ + ": --" + name + " must be " + expected + ", got " + get(name));
    return v;
  }
  /// The same for a value the library takes as a float: `ok` judges it as
  /// that float, so a number that only a double holds (1e39 is Inf as a
  /// float, 1e-50 is 0) is refused here rather than by the library.
  template <class Ok>
  float get_float(const std::string& name, Ok ok, const std::string& expected) const {
    return float(get_double(name, [&](double v) { return ok(float(v)); }, expected));
  }

  void print_help(std::ostream& out) const {
    out << "usage: " << command_ << " [options]\n\n" << summary_ << "\n\noptions:\n";
    for (const auto& s : specs_) {
      std::string help = s.help;
      if (s.fallback) help += " (default: " + *s.fallback + ")";
      if (s.required) help += " (required)";
      print_option(out, "--" + s.name + (s.is_flag ? "" : " <" + s.value_name + ">"), help);
    }
    print_option(out, "--help", "print this help");
  }

 private:
  struct spec {
    std::string name, value_name, help;
    std::optional<std::string> fallback;
    bool required;
    bool is_flag;
  };

  /// One option's line: its help in a column of its own, words wrapped at 120
  /// columns and continued there.
  static void print_option(std::ostream& out, const std::string& option, const std::string& help) {
    constexpr std::size_t column = 30, width = 120;
    std::string left = "  " + option;
    if (left.size() < column) left.resize(column, ' ');
    out << left;
    std::size_t at = left.size(), begin = 0;
    while (begin < help.size()) {
      const std::size_t end = std::min(help.find_first_of(" \n", begin), help.size());  // a line break in the help is a space: it is rewrapped
      const std::size_t word = end - begin;
      if (at + 1 + word > width && at > column) {
        out << '\n' << std::string(column, ' ');
        at = column;
      }
      out << ' ' << help.substr(begin, word);
      at += 1 + word;
      begin = end + 1;
    }
    out << '\n';
  }

  const spec* find(const std::string& name) const {
    for (const auto& s : specs_)
      if (s.name == name) return &s;
    return nullptr;
  }

  template <class T, class F>
  T parse_number(const std::string& name, F convert) const {
    const std::string v = get(name);
    try {
      std::size_t end = 0;
      const T out = convert(v, &end);
      if (end == v.size()) return out;
    } catch (const std::exception&) {
    }
    throw usage_error(command_ + ": --" + name + " expects a number, got '" + v + "'");
  }

  std::string command_, summary_;
  std::vector<spec> specs_;
  std::map<std::string, std::string> values_;
};

/// Where examples find ../shared when a path is not given: $MOEFORGE_DATA, else the build-time default.
inline std::string data_root() {
  const char* env = std::getenv("MOEFORGE_DATA");
  return env && *env ? env : MOEFORGE_DEFAULT_DATA;
}

}  // namespace moeforge::cli
