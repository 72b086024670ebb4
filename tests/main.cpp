// The test executables' main (test_distributed.cpp has its own, which starts MPI).
#include "support/run_catch.hpp"

int main(int argc, char** argv) { return moeforge::test::run_catch(argc, argv); }
