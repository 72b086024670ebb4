// Machine probes for the kernel benchmarks: DRAM streaming-read bandwidth,
// FP32 FMA and BF16 dot-product peaks, and how far apart streaming and
// arithmetic let each other run, measured in the same run as the kernels
// they judge.
#pragma once

#include <omp.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include "moeforge/runtime/gemm.hpp"

namespace moeforge::bench {

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

namespace detail {
/// The read probe's 512 MiB, written once and kept for the process. A fresh
/// buffer per probe (page faults, then freeing it) disturbed what ran next on
/// this VM, and the kernels are timed right after their probes: an MoE
/// layer's first few hundred calls after such a probe took up to 1.4x as
/// long as the later ones (llama-7b S1A1E8's layer at one token, BF16);
/// after probes of a kept buffer they ran as fast as the rest.
inline std::vector<float>& probe_storage() {
  static std::vector<float> buf;
  return buf;
}
inline const std::vector<float>& probe_buffer(int threads) {
  std::vector<float>& buf = probe_storage();
  if (buf.empty()) {
    const std::size_t n = (std::size_t(512) << 20) / sizeof(float);
    buf.resize(n);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (std::ptrdiff_t i = 0; i < std::ptrdiff_t(n); ++i) buf[std::size_t(i)] = 1.0f;
  }
  return buf;
}
}  // namespace detail

/// Resident megabytes the read probe keeps (0 before its first use), for
/// figures of resident memory that are the model's alone.
inline double probe_resident_mb() { return double(detail::probe_storage().size() * sizeof(float)) / double(1 << 20); }

/// Best-of-5 read bandwidth (GB/s) over a 512 MiB buffer, far larger than L3.
/// Each thread reads its slice as 4 concurrent streams with full-width loads:
/// one stream per core leaves the prefetchers short of the DRAM limit (about
/// 2/3 of it on this machine), and a kernel reading many weight rows at once
/// would then appear to beat "the" bandwidth.
inline double probe_read_gbps(int threads) {
  constexpr std::size_t streams = 4, step = 16;
  const std::vector<float>& buf = detail::probe_buffer(threads);
  const std::size_t n = buf.size();
  double best = 0, sink = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
      const std::size_t per = n / std::size_t(omp_get_num_threads());
      const std::size_t len = per / streams / step * step;
      const float* base = buf.data() + per * std::size_t(omp_get_thread_num());
#if defined(__AVX2__)
      __m256 acc[streams];
      for (auto& a : acc) a = _mm256_setzero_ps();
      for (std::size_t i = 0; i < len; i += step)
        for (std::size_t s = 0; s < streams; ++s) {
          const float* p = base + s * len + i;
          acc[s] = _mm256_add_ps(acc[s], _mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)));
        }
      alignas(32) float lanes[8];
      for (auto& a : acc) {
        _mm256_store_ps(lanes, a);
        for (float v : lanes) total += v;
      }
#else
      float acc[streams][step] = {};
      for (std::size_t i = 0; i < len; i += step)
        for (std::size_t s = 0; s < streams; ++s)
          for (std::size_t j = 0; j < step; ++j) acc[s][j] += base[s * len + i + j];
      for (auto& a : acc)
        for (float v : a) total += v;
#endif
    }
    sink += total;
    best = std::max(best, double(n * sizeof(float)) / seconds_since(t0) / 1e9);
  }
  return sink < 0 ? 0 : best;
}

/// Best-of-5 FP32 FMA throughput (GFLOP/s) of `threads` threads, each with 12
/// independent accumulators (more than latency × ports) kept in registers, at
/// the widest vectors the build targets (AVX-512 where -march=native has it).
inline double probe_fma_gflops(int threads) {
  constexpr int iters = 20'000'000;
#if defined(__AVX512F__)
  using reg = __m512;
  constexpr int width = 16;
  const auto fma = [](reg a, reg m, reg c) { return _mm512_fmadd_ps(a, m, c); };
  const auto splat = [](float v) { return _mm512_set1_ps(v); };
  const auto store = [](float* f, reg v) { _mm512_storeu_ps(f, v); };
#elif defined(__AVX2__) && defined(__FMA__)
  using reg = __m256;
  constexpr int width = 8;
  const auto fma = [](reg a, reg m, reg c) { return _mm256_fmadd_ps(a, m, c); };
  const auto splat = [](float v) { return _mm256_set1_ps(v); };
  const auto store = [](float* f, reg v) { _mm256_storeu_ps(f, v); };
#else
  using reg = float;
  constexpr int width = 1;
  const auto fma = [](reg a, reg m, reg c) { return a * m + c; };
  const auto splat = [](float v) { return v; };
  const auto store = [](float* f, reg v) { *f = v; };
#endif
  const auto sum = [&](reg v) {
    float f[width];
    store(f, v);
    double s = 0;
    for (float x : f) s += x;
    return s;
  };
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

/// Best-of-5 BF16 dot-product throughput (GFLOP/s, a multiply-add counted as
/// two) of `threads` threads running `vdpbf16ps` (16 lanes × 2 products) on
/// 24 register accumulators: the peak of BF16 weights meeting BF16 tokens.
/// Twelve, as the FMA probe keeps, are too few chains for its latency on Zen 5:
/// they measured 831-835 GFLOP/s where 16 and 24 reached 892-904, and the
/// kernel's own 8 × 32 micro-kernel (16 chains) 861-876 on data in L1.
/// 0 when the build lacks AVX512_BF16 (BF16 weights then run at the FP32 peak).
inline double probe_bf16_dot_gflops(int threads) {
#if defined(__AVX512BF16__)
  constexpr int iters = 10'000'000, chains = 24;
  double best = 0, sink = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = (__m512bh)_mm512_set1_epi32(0x33803380);  // 1.0 and ~6e-8
      __m512 a[chains];
      for (int i = 0; i < chains; ++i) a[i] = _mm512_set1_ps(float(i));
      for (int it = 0; it < iters; ++it)
#pragma GCC unroll 24
        for (int i = 0; i < chains; ++i) a[i] = _mm512_dpbf16_ps(a[i], x, y);
      alignas(64) float f[16];
      for (int i = 0; i < chains; ++i) {
        _mm512_store_ps(f, a[i]);
        for (float v : f) total += v;
      }
    }
    sink += total;
    best = std::max(best, 4.0 * chains * 16 * double(iters) * threads / seconds_since(t0) / 1e9);
  }
  return sink < 0 ? 0 : best;
#else
  (void)threads;
  return 0;
#endif
}

/// The simplest product at the machine's balance point, where streaming and
/// arithmetic must overlap completely for a kernel to reach its limit: the
/// kernel's own micro-kernel over weight slices (KC × NR) read once from
/// DRAM by `tokens` tokens (token panels as panel_product cuts them, as many
/// as bring the FLOPs a weight byte, 2·tokens / its size, nearest to peak /
/// bandwidth: 16 F32 tokens (two panels of MR) or 18 BF16 ones (three of
/// gemm_pair_rows) on a 430 GFLOP/s FP32, 860 BF16, 55 GB/s machine), each
/// panel fetching its share of the next slices into L2 while it reads (as
/// panel_product does). F32 weights one slice at a time, or BF16 ones two
/// side by side meeting BF16 tokens in `vdpbf16ps` (`bf16`, where the build
/// has it). `ratio` is its best time
/// over max(bytes / gbps, FLOPs / gflops), the limit_ratio of a product with
/// nothing else to do at that balance: a reference for layers whose experts
/// sit near it (E8A2 at 64 tokens). The same calls are then timed over slices
/// a core's L2 holds (its arithmetic alone) and set beside streaming alone
/// (the bytes at gbps): `overlap` is how much of the shorter of the two the
/// core hides under the other, 1 where the time is the longer one alone, 0
/// where it is their sum. (A Zen 5 VM measured 40-55% for F32 and 10-15% for
/// BF16, and no better for any other way of combining one core's DRAM stream
/// with its multiply-adds that was tried: prefetching the next slices at any
/// pace or in bursts, slices small enough for L1, a single pass broadcasting
/// weights to 16 tokens in registers.) No tokens and no ratio for BF16 where
/// the build lacks vdpbf16ps.
struct ridge_probe {
  int tokens = 0;
  double ratio = 0;
  double overlap = 0;
};

inline ridge_probe probe_ridge(int threads, double gbps, double gflops, bool bf16 = false) {
  namespace rt = runtime::detail;
  if (bf16 && !rt::bf16_dot_available) return {};
  const std::size_t value_bytes = bf16 ? 2 : 4;
  const index_t rows = bf16 ? rt::gemm_pair_rows : rt::gemm_mr;  // a token panel's tokens
  const int side = bf16 ? 2 : 1;                                   // weight slices a token panel reads side by side
  const index_t slice = rt::gemm_kc * rt::gemm_nr * side;          // what one step reads (values)
  const int panels = std::max(1, int(std::lround(gflops / gbps * double(value_bytes) / 2 / double(rows))));
  const std::vector<float> tokens(std::size_t(panels * rt::gemm_kc * rt::gemm_mr), 0.5f);
  const std::vector<std::uint32_t> pairs(std::size_t(panels * rt::gemm_kc / 2 * rt::gemm_mr), 0x3f003f00u);  // 0.5 twice
  const std::vector<float>& buf = detail::probe_buffer(threads);
  const char* const bytes = reinterpret_cast<const char*>(buf.data());
  const std::size_t slice_bytes = std::size_t(slice) * value_bytes, one_bytes = slice_bytes / std::size_t(side);
  // A thread's slices from DRAM, or (`held`) the same number of calls over
  // the first few of them, which stay in its core's L2.
  constexpr std::size_t held_slices = 4;
  const auto time_calls = [&](bool held) {
    double best = 1e300, sink = 0, values = 0;
    for (int rep = 0; rep < 3; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
      {
        const std::size_t slices = buf.size() * sizeof(float) / slice_bytes / std::size_t(omp_get_num_threads());  // this thread's
#pragma omp single
        values = double(slices) * double(slice) * omp_get_num_threads();
        std::vector<float> tiles(std::size_t(panels * side * rt::gemm_tile));
        const char* base = bytes + slices * slice_bytes * std::size_t(omp_get_thread_num());
        for (std::size_t s = 0; s < slices; ++s) {
          const char* b = base + (held ? s % held_slices : s) * slice_bytes;
          for (int ip = 0; ip < panels; ++ip) {
            rt::fetch_share pf;
            pf.own_ahead = ip == 0;
            if (s + 1 < slices && !held)
              for (int q = 0; q < side; ++q) {
                pf.from[q] = b + slice_bytes + std::size_t(q) * one_bytes + std::size_t(ip) * one_bytes / std::size_t(panels);
                pf.pace[q] = (value_bytes * rt::gemm_nr << 8) / std::size_t(panels);
              }
            float* tile = tiles.data() + ip * side * rt::gemm_tile;
            if (bf16) {
              const bfloat16* w[2] = {reinterpret_cast<const bfloat16*>(b), reinterpret_cast<const bfloat16*>(b + one_bytes)};
              rt::micro_kernel_dot_rows<int(rt::gemm_pair_rows), 2>(rt::gemm_kc, pairs.data() + ip * rt::gemm_kc / 2 * rt::gemm_mr, w, tile, true,
                                                                    pf);
            } else {
              const auto* w = reinterpret_cast<const float*>(b);
              rt::micro_kernel_rows<int(rt::gemm_mr), 1>(rt::gemm_kc, rt::packed_tokens{tokens.data() + ip * rt::gemm_kc * rt::gemm_mr}, &w, tile,
                                                          true, pf);
            }
          }
          total += tiles[s % tiles.size()];
        }
      }
      sink += total;
      best = std::min(best, seconds_since(t0));
    }
    return std::pair<double, double>{sink < 0 ? 0 : best, values};
  };
  const auto [both, values] = time_calls(false);
  const double arithmetic = time_calls(true).first;
  const double streaming = values * double(value_bytes) / (gbps * 1e9);
  const double limit = std::max(streaming, 2.0 * values * panels * double(rows) / (gflops * 1e9));
  const double hidden = (streaming + arithmetic - both) / std::min(streaming, arithmetic);
  return {panels * int(rows), both / limit, std::clamp(hidden, 0.0, 1.0)};
}
}  // namespace moeforge::bench
