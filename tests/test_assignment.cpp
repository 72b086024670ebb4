// Exact balanced assignment: optimal (vs a Hungarian solve of the expanded
// matrix) and balanced, on many small random instances with ties.
#include <catch2/catch.hpp>

#include <functional>
#include <limits>
#include <random>

#include "moeforge/convert/assignment.hpp"

using moeforge::index_t;

namespace {

// O(n^2·M) Hungarian (potentials) for an n×M matrix, n <= M; returns the minimum total.
template <class T>
T hungarian(const std::vector<std::vector<T>>& a) {
  const std::size_t n = a.size(), m = a[0].size();
  const T inf = std::numeric_limits<T>::max() / 4;
  std::vector<T> u(n + 1, 0), v(m + 1, 0);
  std::vector<std::size_t> p(m + 1, 0), way(m + 1, 0);
  for (std::size_t i = 1; i <= n; ++i) {
    p[0] = i;
    std::size_t j0 = 0;
    std::vector<T> minv(m + 1, inf);
    std::vector<bool> used(m + 1, false);
    do {
      used[j0] = true;
      const std::size_t i0 = p[j0];
      T delta = inf;
      std::size_t j1 = 0;
      for (std::size_t j = 1; j <= m; ++j) {
        if (used[j]) continue;
        const T cur = a[i0 - 1][j - 1] - u[i0] - v[j];
        if (cur < minv[j]) minv[j] = cur, way[j] = j0;
        if (minv[j] < delta) delta = minv[j], j1 = j;
      }
      for (std::size_t j = 0; j <= m; ++j) {
        if (used[j]) u[p[j]] += delta, v[j] -= delta;
        else minv[j] -= delta;
      }
      j0 = j1;
    } while (p[j0] != 0);
    do {
      const std::size_t j1 = way[j0];
      p[j0] = p[j1];
      j0 = j1;
    } while (j0);
  }
  T total = 0;
  for (std::size_t j = 1; j <= m; ++j)
    if (p[j]) total += a[p[j] - 1][j - 1];
  return total;
}

template <class T>
void check_instance(std::mt19937& rng, index_t n, const std::vector<index_t>& cap, int max_cost) {
  const index_t k = index_t(cap.size());
  std::uniform_int_distribution<int> d(0, max_cost);
  std::vector<std::vector<T>> c(static_cast<std::size_t>(n), std::vector<T>(static_cast<std::size_t>(k)));
  for (auto& row : c)
    for (auto& x : row) x = T(d(rng));
  const auto res = moeforge::convert::balanced_assignment<T>(n, cap, [&](index_t i, index_t j) { return c[std::size_t(i)][std::size_t(j)]; });
  std::vector<index_t> used(std::size_t(k), 0);
  T total = 0;
  for (index_t i = 0; i < n; ++i) {
    const index_t j = res.cluster[std::size_t(i)];
    REQUIRE(j >= 0);
    REQUIRE(j < k);
    ++used[std::size_t(j)];
    total += c[std::size_t(i)][std::size_t(j)];
  }
  for (index_t j = 0; j < k; ++j) REQUIRE(used[std::size_t(j)] <= cap[std::size_t(j)]);
  REQUIRE(total == res.total);
  // Expanded matrix: cluster j repeated cap[j] times.
  std::vector<std::vector<T>> e(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < k; ++j)
      for (index_t r = 0; r < cap[std::size_t(j)]; ++r) e[std::size_t(i)].push_back(c[std::size_t(i)][std::size_t(j)]);
  REQUIRE(res.total == hungarian(e));
}

}  // namespace

TEST_CASE("balanced assignment is optimal and fills every cluster exactly") {
  std::mt19937 rng(12345);
  for (int trial = 0; trial < 400; ++trial) {
    const index_t k = 1 + index_t(rng() % 6);
    const index_t m = 1 + index_t(rng() % 6);
    // Small cost ranges make many ties.
    check_instance<std::int64_t>(rng, k * m, std::vector<index_t>(std::size_t(k), m), trial % 2 ? 3 : 1000);
  }
}

TEST_CASE("balanced assignment is optimal with unequal spare capacity") {
  std::mt19937 rng(777);
  for (int trial = 0; trial < 200; ++trial) {
    const index_t k = 1 + index_t(rng() % 5);
    std::vector<index_t> cap;
    index_t total = 0;
    for (index_t j = 0; j < k; ++j) cap.push_back(index_t(rng() % 5)), total += cap.back();
    if (total == 0) continue;
    const index_t n = 1 + index_t(rng() % std::uint32_t(total));
    check_instance<std::int64_t>(rng, n, cap, 20);
    check_instance<std::int64_t>(rng, n, cap, 1 << 20);
  }
}

TEST_CASE("balanced assignment rejects clusters too small for the items") {
  REQUIRE_THROWS_AS(moeforge::convert::balanced_assignment<std::int64_t>(5, {2, 2}, [](index_t, index_t) { return std::int64_t(0); }),
                    moeforge::config_error);
}

TEST_CASE("balanced assignment with a zero-cost sink (the leftovers) is optimal against brute force") {
  // k clusters of exactly m plus a sink of capacity n − k·m whose cost is 0:
  // the reference's n × n LAP whose last n − k·m columns are zero.
  std::mt19937 rng(4242);
  for (int trial = 0; trial < 300; ++trial) {
    const index_t k = 1 + index_t(rng() % 3);
    const index_t m = 1 + index_t(rng() % 3);
    const index_t spare = 1 + index_t(rng() % 3);  // n <= 12: brute force stays small
    const index_t n = k * m + spare;
    std::uniform_int_distribution<int> d(0, trial % 3 == 0 ? 2 : 50);
    std::vector<std::vector<std::int64_t>> c(static_cast<std::size_t>(n), std::vector<std::int64_t>(static_cast<std::size_t>(k)));
    for (auto& row : c)
      for (auto& x : row) x = d(rng);
    std::vector<index_t> cap(std::size_t(k), m);
    cap.push_back(spare);
    const auto res = moeforge::convert::balanced_assignment<std::int64_t>(
        n, cap, [&](index_t i, index_t j) { return j < k ? c[std::size_t(i)][std::size_t(j)] : std::int64_t(0); });
    std::vector<index_t> used(std::size_t(k + 1), 0);
    std::int64_t total = 0;
    for (index_t i = 0; i < n; ++i) {
      const index_t j = res.cluster[std::size_t(i)];
      REQUIRE(j >= 0);
      REQUIRE(j <= k);
      ++used[std::size_t(j)];
      if (j < k) total += c[std::size_t(i)][std::size_t(j)];
    }
    // Every real cluster exactly full (the sink takes exactly the spare items).
    for (index_t j = 0; j < k; ++j) REQUIRE(used[std::size_t(j)] == m);
    REQUIRE(used[std::size_t(k)] == spare);
    REQUIRE(total == res.total);
    // Brute force: every labelling of the n items with clusters 0..k (sink = k) that fills the capacities.
    std::int64_t best = std::numeric_limits<std::int64_t>::max();
    std::vector<index_t> label(static_cast<std::size_t>(n), 0);
    std::vector<index_t> fill(std::size_t(k + 1), 0);
    std::function<void(index_t, std::int64_t)> search = [&](index_t i, std::int64_t cost) {
      if (cost >= best) return;
      if (i == n) {
        best = cost;
        return;
      }
      for (index_t j = 0; j <= k; ++j) {
        if (fill[std::size_t(j)] == cap[std::size_t(j)]) continue;
        ++fill[std::size_t(j)];
        search(i + 1, cost + (j < k ? c[std::size_t(i)][std::size_t(j)] : 0));
        --fill[std::size_t(j)];
      }
    };
    search(0, 0);
    INFO("trial " << trial << " n " << n << " k " << k << " m " << m);
    REQUIRE(res.total == best);
  }
}
