// x·Wᵀ, the one dense product the model needs outside the FFN kernel
// (attention projections, routers, the classifier), computed by the kernel's
// own products so that its arithmetic depends only on the shapes. Eigen's
// GEMM does not promise that: inside a nested OpenMP region it may take its
// multi-threaded blocking even though it runs on one thread, so the same
// product rounds differently in perplexity's window-parallel loop with one
// thread or with two.
#pragma once

#include "moeforge/runtime/stream_kernel.hpp"

namespace moeforge::runtime {

/// x [T, in] · wᵀ for row-major weights w [out, in] → [T, out].
inline matrix project(const_matrix_ref x, const matrix& w) {
  moeforge::detail::require_shape(x, x.rows(), w.cols(), "projection input");
  return detail::times_transpose({detail::rows_of(w)}, x);
}

}  // namespace moeforge::runtime
