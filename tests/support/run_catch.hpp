// The entry to Catch2's runner, compiled once per tree in catch.cpp (Catch's
// Session is only declared where its implementation is compiled).
#pragma once

namespace moeforge::test {
/// Runs the test cases the command line selects; returns the exit status.
int run_catch(int argc, char** argv);
}  // namespace moeforge::test
