// Large weight buffers: on transparent huge pages, and reused rather than
// freed while a model loads. Two costs of 4 KiB pages show at model sizes:
// decode streams every panel once per token, and a multi-gigabyte model's
// panels span far more pages than the TLB reaches; and filling fresh memory
// takes one page fault per 4 KiB, which on some virtual machines costs tens
// of microseconds each (measured here: loading an 8-layer Mixtral-shaped BF16
// model went from 61 s to 17 s once its buffers were on huge pages). With THP
// in "madvise" mode (Debian's default) only memory that asks gets huge pages;
// without THP the advice is ignored.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <type_traits>

#include "moeforge/core/tensor.hpp"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace moeforge::detail {

constexpr std::size_t huge_page_bytes = std::size_t(2) << 20;

/// Advises the whole huge pages inside [p, p + bytes) to be backed by huge
/// pages; call it before first touching fresh memory. Advice only: nothing
/// changes where the kernel does not support it.
inline void advise_huge_pages([[maybe_unused]] void* p, [[maybe_unused]] std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto begin = (reinterpret_cast<std::uintptr_t>(p) + huge_page_bytes - 1) / huge_page_bytes * huge_page_bytes;
  const auto end = (reinterpret_cast<std::uintptr_t>(p) + bytes) / huge_page_bytes * huge_page_bytes;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

/// A cache-line aligned allocator whose allocations of a huge page or more
/// are aligned to one and advised to use huge pages. Default-made elements
/// are default-initialised (unspecified values for scalars).
template <class T>
struct huge_page_allocator {
  using value_type = T;
  static constexpr std::size_t cache_line = 64;

  huge_page_allocator() = default;
  template <class U>
  huge_page_allocator(const huge_page_allocator<U>&) {}

  T* allocate(std::size_t n) {
    const std::size_t bytes = n * sizeof(T);
    const std::size_t align = bytes >= huge_page_bytes ? huge_page_bytes : cache_line;
    void* p = std::aligned_alloc(align, (bytes + align - 1) / align * align);  // the size must be a multiple of the alignment
    if (!p) throw std::bad_alloc();
    if (align == huge_page_bytes) advise_huge_pages(p, bytes);
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  /// Elements made without a value are left unspecified, not zeroed: their
  /// owners write them all, and zeroing gigabytes of weights first is a pass
  /// over memory for nothing.
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }

  template <class U>
  bool operator==(const huge_page_allocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const huge_page_allocator<U>&) const { return false; }
};

/// A rows × cols matrix with unspecified values in new storage, advised onto
/// huge pages before anything touches it.
inline matrix huge_page_matrix(index_t rows, index_t cols) {
  matrix m(rows, cols);
  advise_huge_pages(m.data(), std::size_t(m.size()) * sizeof(float));
  return m;
}

/// m reshaped to rows × cols: its storage kept when it holds as many values
/// (no allocation, no fresh pages to fault in), else new storage on huge
/// pages. For buffers reused call after call; the values are unspecified.
inline matrix& fit_matrix(matrix& m, index_t rows, index_t cols) {
  if (m.size() == rows * cols)
    m.resize(rows, cols);
  else
    m = huge_page_matrix(rows, cols);
  return m;
}

/// Storage of big F32 matrices handed back for reuse. Loading a model reads
/// each layer into fresh matrices, packs them and frees them; glibc returns
/// blocks that big to the system at once, so every layer faulted in fresh,
/// zeroed pages again (half the CPU time of loading an 8-layer Mixtral-shaped
/// BF16 model here went to the kernel clearing pages). Through a pool the
/// next layer reads into the storage the last one left. Thread-safe.
class matrix_pool {
 public:
  /// A rows × cols matrix with unspecified values: a pooled matrix of as many
  /// elements reshaped (no allocation), else new storage on huge pages.
  matrix take(index_t rows, index_t cols) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (const auto it = free_.find(rows * cols); it != free_.end()) {
        matrix m = std::move(it->second);
        free_.erase(it);
        m.resize(rows, cols);  // same size: Eigen keeps the buffer
        return m;
      }
    }
    return huge_page_matrix(rows, cols);
  }
  /// Keeps m's storage for a later take() (m is left empty).
  void give(matrix&& m) {
    if (m.size() == 0) return;
    std::lock_guard<std::mutex> lock(mutex_);
    const index_t n = m.size();
    free_.emplace(n, std::move(m));
  }
  /// give() as a callable, for release(ffn&, reuse) and transformer::matrix_sink.
  auto sink() {
    return [this](matrix&& m) { give(std::move(m)); };
  }
  /// Matrices held for reuse.
  std::size_t held() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return free_.size();
  }
  /// Frees what is held: a loader calls it once a layer is read, so storage
  /// of a shape the next layers lack (or from a source that never takes) is
  /// not kept to the end, and the pool holds at most one layer.
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.clear();
  }

 private:
  mutable std::mutex mutex_;
  std::multimap<index_t, matrix> free_;
};

/// A rows × cols matrix from `pool` when given, else in new storage on huge pages.
inline matrix new_matrix(matrix_pool* pool, index_t rows, index_t cols) { return pool ? pool->take(rows, cols) : huge_page_matrix(rows, cols); }

}  // namespace moeforge::detail
