// Running a computation with a given OpenMP thread count, and with each of
// 1-4 threads for the bit-identity tests. The caller's setting is restored
// afterwards (even when the computation throws), so a test never leaves its
// thread count to the tests that run after it.
#pragma once

#include <vector>

#include <omp.h>

namespace moeforge::test {

template <class F>
auto with_threads(int threads, F&& f) {
  struct restore {
    int saved = omp_get_max_threads();
    ~restore() { omp_set_num_threads(saved); }
  } guard;
  omp_set_num_threads(threads);
  return f();
}

/// f() with 1, 2, 3 and 4 threads, in that order.
template <class F>
auto for_each_thread_count(F&& f) {
  std::vector<decltype(f())> out;
  for (int threads : {1, 2, 3, 4}) out.push_back(with_threads(threads, f));
  return out;
}

}  // namespace moeforge::test
