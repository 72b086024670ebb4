// The dense FFN kernel: the same task decomposition as the MoE kernel with one
// expert that takes every token, so MoE speedups are measured against a dense
// baseline of the same quality.
#pragma once

#include "moeforge/runtime/moe_ffn.hpp"

namespace moeforge::runtime {

namespace detail {

/// dense_forward reading f's weights from its prepared panels (`packed`), or
/// from f itself (packed per task) when null.
inline void dense_forward_packed(const ffn& f, const packed_ffn* packed, const_matrix_ref x, matrix_ref y) {
  check_input(x, y, f.hidden(), "dense ffn");
  if (x.rows() == 0) return;
  std::vector<job> jobs;
  jobs.push_back(whole_batch_job(f, packed, x));
  run_jobs(jobs, x, y);
}

}  // namespace detail

/// y [T, H] = ffn(x [T, H]); y is overwritten. Throws shape_error or
/// value_error (NaN/Inf in x) before any work starts.
inline void dense_forward(const ffn& f, const_matrix_ref x, matrix_ref y) { detail::dense_forward_packed(f, nullptr, x, y); }

inline matrix dense_forward(const ffn& f, const_matrix_ref x) {
  matrix y(x.rows(), f.hidden());
  dense_forward(f, x, y);
  return y;
}

}  // namespace moeforge::runtime
