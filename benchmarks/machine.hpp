// Machine probes for the kernel benchmarks: DRAM streaming-read bandwidth and
// FP32 FMA peak, measured in the same run as the kernels they judge.
#pragma once

#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <chrono>
#include <vector>

namespace moeforge::bench {

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Best-of-5 read bandwidth (GB/s) over a 256 MiB buffer, far larger than L3.
inline double probe_read_gbps(int threads) {
  const std::size_t n = (std::size_t(256) << 20) / sizeof(float);
  std::vector<float> buf(n, 1.0f);
  double best = 0, sink = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    double total = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
    for (std::ptrdiff_t b = 0; b < std::ptrdiff_t(n / 4096); ++b) {
      float acc[32] = {};
      const float* p = buf.data() + std::size_t(b) * 4096;
      for (int i = 0; i < 4096; i += 32)
        for (int j = 0; j < 32; ++j) acc[j] += p[i + j];
      for (float a : acc) total += a;
    }
    sink += total;
    best = std::max(best, double(n * sizeof(float)) / seconds_since(t0) / 1e9);
  }
  return sink < 0 ? 0 : best;
}

/// Best-of-5 FP32 FMA throughput (GFLOP/s) of `threads` threads, each with 12
/// independent accumulators (more than latency × ports) kept in registers.
inline double probe_fma_gflops(int threads) {
  constexpr int iters = 20'000'000;
#if defined(__AVX2__) && defined(__FMA__)
  using reg = __m256;
  constexpr int width = 8;
  const auto fma = [](reg a, reg m, reg c) { return _mm256_fmadd_ps(a, m, c); };
  const auto splat = [](float v) { return _mm256_set1_ps(v); };
  const auto sum = [](reg v) {
    alignas(32) float f[8];
    _mm256_store_ps(f, v);
    return double(f[0]) + f[1] + f[2] + f[3] + f[4] + f[5] + f[6] + f[7];
  };
#else
  using reg = float;
  constexpr int width = 1;
  const auto fma = [](reg a, reg m, reg c) { return a * m + c; };
  const auto splat = [](float v) { return v; };
  const auto sum = [](reg v) { return double(v); };
#endif
  double best = 0, sink = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
      const reg m = splat(0.999999f), c = splat(1e-7f);
      reg a0 = splat(1), a1 = splat(2), a2 = splat(3), a3 = splat(4), a4 = splat(5), a5 = splat(6);
      reg a6 = splat(7), a7 = splat(8), a8 = splat(9), a9 = splat(10), a10 = splat(11), a11 = splat(12);
      for (int it = 0; it < iters; ++it) {
        a0 = fma(a0, m, c), a1 = fma(a1, m, c), a2 = fma(a2, m, c), a3 = fma(a3, m, c);
        a4 = fma(a4, m, c), a5 = fma(a5, m, c), a6 = fma(a6, m, c), a7 = fma(a7, m, c);
        a8 = fma(a8, m, c), a9 = fma(a9, m, c), a10 = fma(a10, m, c), a11 = fma(a11, m, c);
      }
      total += sum(a0) + sum(a1) + sum(a2) + sum(a3) + sum(a4) + sum(a5) + sum(a6) + sum(a7) + sum(a8) + sum(a9) + sum(a10) +
               sum(a11);
    }
    sink += total;
    best = std::max(best, 2.0 * 12 * width * double(iters) * threads / seconds_since(t0) / 1e9);
  }
  return sink < 0 ? 0 : best;
}

}  // namespace moeforge::bench
