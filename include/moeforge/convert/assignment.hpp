// Exact minimum-cost balanced assignment of n items to k capacitated clusters
// (a transportation problem) in O(n·k) memory: successive shortest paths.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <queue>
#include <type_traits>
#include <vector>

#include "moeforge/core/tensor.hpp"

namespace moeforge::convert {

template <class Cost>
struct assignment_result {
  std::vector<index_t> cluster;  ///< [n] cluster of each item
  Cost total = 0;
};

namespace detail {

// Items are inserted one at a time; each insertion follows the cheapest chain
// "new item -> cluster a, some member of a -> cluster b, ... -> cluster with room".
// An exchange edge a->b costs min over members x of a of cost(x,b) - cost(x,a);
// these minima come from one lazy heap per ordered pair. Because the partial
// assignment stays optimal (no negative cycle), Bellman-Ford over the k
// cluster nodes finds the shortest chain, and the final assignment is optimal.
template <class Cost>
class balanced_solver {
 public:
  balanced_solver(index_t n, index_t k, const std::vector<index_t>& capacity, std::function<Cost(index_t, index_t)> cost)
      : n_(n), k_(k), room_(capacity), cost_(std::move(cost)), where_(std::size_t(n), -1), heaps_(std::size_t(k * k)) {}

  assignment_result<Cost> run() {
    for (index_t i = 0; i < n_; ++i) insert(i);
    assignment_result<Cost> out;
    out.cluster = where_;
    for (index_t i = 0; i < n_; ++i) out.total += cost_(i, where_[std::size_t(i)]);
    return out;
  }

 private:
  struct entry {
    Cost delta;
    index_t item;
    bool operator>(const entry& o) const { return delta > o.delta || (delta == o.delta && item > o.item); }
  };
  using heap = std::priority_queue<entry, std::vector<entry>, std::greater<entry>>;

  heap& pair_heap(index_t a, index_t b) { return heaps_[std::size_t(a * k_ + b)]; }

  // Cheapest member of a to move to b, dropping entries of items that left a.
  const entry* top(index_t a, index_t b) {
    heap& h = pair_heap(a, b);
    while (!h.empty() && where_[std::size_t(h.top().item)] != a) h.pop();
    return h.empty() ? nullptr : &h.top();
  }

  void place(index_t item, index_t c) {
    where_[std::size_t(item)] = c;
    for (index_t b = 0; b < k_; ++b)
      if (b != c) pair_heap(c, b).push(entry{cost_(item, b) - cost_(item, c), item});
  }

  void insert(index_t item) {
    const std::size_t k = std::size_t(k_);
    std::vector<Cost> dist(k);
    std::vector<index_t> pred(k, -1), moved(k, -1);
    for (index_t j = 0; j < k_; ++j) dist[std::size_t(j)] = cost_(item, j);
    // Edge weights are read once: the graph does not change during the search.
    std::vector<Cost> w(k * k);
    std::vector<index_t> who(k * k, -1);
    for (index_t a = 0; a < k_; ++a)
      for (index_t b = 0; b < k_; ++b) {
        if (a == b) continue;
        if (const entry* e = top(a, b)) {
          w[std::size_t(a * k_ + b)] = e->delta;
          who[std::size_t(a * k_ + b)] = e->item;
        }
      }
    for (index_t pass = 0; pass < k_; ++pass) {
      bool changed = false;
      for (index_t a = 0; a < k_; ++a)
        for (index_t b = 0; b < k_; ++b) {
          const std::size_t e = std::size_t(a * k_ + b);
          if (who[e] < 0) continue;
          const Cost d = dist[std::size_t(a)] + w[e];
          if (d < dist[std::size_t(b)]) {
            dist[std::size_t(b)] = d;
            pred[std::size_t(b)] = a;
            moved[std::size_t(b)] = who[e];
            changed = true;
          }
        }
      if (!changed) break;
    }
    index_t end = -1;
    for (index_t j = 0; j < k_; ++j)
      if (room_[std::size_t(j)] > 0 && (end < 0 || dist[std::size_t(j)] < dist[std::size_t(end)])) end = j;
    --room_[std::size_t(end)];
    // Walk back: the item moved into b came from pred[b]; the chain starts with `item`.
    // At most k hops: the predecessor graph is a tree when there is no negative cycle.
    index_t b = end;
    for (index_t hop = 0; hop < k_ && pred[std::size_t(b)] >= 0; ++hop) {
      const index_t a = pred[std::size_t(b)];
      place(moved[std::size_t(b)], b);
      b = a;
    }
    place(item, b);
  }

  index_t n_, k_;
  std::vector<index_t> room_;
  std::function<Cost(index_t, index_t)> cost_;
  std::vector<index_t> where_;
  std::vector<heap> heaps_;
};

}  // namespace detail

/// Minimum total cost assignment of items 0..n-1 to clusters 0..k-1 with at
/// most capacity[j] items in cluster j (sum of capacities >= n). `cost(i, j)`
/// must be cheap (it is called O(n·k) times plus once per move). Exact, for
/// integer costs: rounded differences of floating costs can make a cycle of
/// exchanges that costs nothing look negative, and the search then moves
/// one item twice, overfilling a cluster (scale such costs to integers).
template <class Cost>
assignment_result<Cost> balanced_assignment(index_t n, const std::vector<index_t>& capacity,
                                            std::function<Cost(index_t, index_t)> cost) {
  static_assert(std::is_integral_v<Cost>, "balanced_assignment is exact for integer costs only");
  const index_t k = index_t(capacity.size());
  if (k == 0) throw config_error("balanced assignment: no clusters");
  index_t total = 0;
  for (index_t c : capacity) {
    if (c < 0) throw config_error("balanced assignment: negative cluster capacity");
    total += c;
  }
  if (total < n) throw config_error(moeforge::detail::cat("balanced assignment: ", n, " items but the clusters hold only ", total));
  return detail::balanced_solver<Cost>(n, k, capacity, std::move(cost)).run();
}

}  // namespace moeforge::convert
