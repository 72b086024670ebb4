// Catch2's implementation, for every test executable (moeforge_catch in
// CMakeLists.txt); each brings its own main, which calls run_catch.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <iostream>

#include "support/run_catch.hpp"

namespace {

/// Catch2 2.x's console reporter indents a name's continuation lines up to
/// the end of its first ": ", and with that indent at or past its 79-column
/// width it loops forever writing the name's first line: a test so named
/// hangs when it fails instead of reporting the failure (a CI run would stop
/// at its time limit, not at the assertion). Names whose ": " ends by this
/// column wrap in at least 19 columns.
constexpr std::size_t last_header_colon = 60;

/// The registered test cases whose names that reporter cannot print.
bool names_print() {
  bool ok = true;
  for (const auto& test : Catch::getRegistryHub().getTestCaseRegistry().getAllTests()) {
    const std::size_t colon = test.name.find(": ");
    if (colon == std::string::npos || colon + 2 <= last_header_colon) continue;
    std::cerr << "test case name's \": \" ends at column " << colon + 2 << ", past " << last_header_colon
              << " (Catch2's reporter would hang printing it on a failure): " << test.name << "\n";
    ok = false;
  }
  return ok;
}

}  // namespace

int moeforge::test::run_catch(int argc, char** argv) { return names_print() ? Catch::Session().run(argc, argv) : 1; }
