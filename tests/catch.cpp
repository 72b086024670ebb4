// Catch2's implementation, for every test executable (moeforge_catch in
// CMakeLists.txt); each brings its own main, which calls run_catch.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "support/run_catch.hpp"

int moeforge::test::run_catch(int argc, char** argv) { return Catch::Session().run(argc, argv); }
