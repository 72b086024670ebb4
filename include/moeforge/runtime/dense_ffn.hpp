// The dense FFN kernel: the same task decomposition as the MoE kernel with one
// expert that takes every token, so MoE speedups are measured against a dense
// baseline of the same quality.
#pragma once

#include "moeforge/runtime/moe_ffn.hpp"

namespace moeforge::runtime {

/// y [T, H] = ffn(x [T, H]); y is overwritten. Throws shape_error or
/// value_error (NaN/Inf in x) before any work starts.
inline void dense_forward(const ffn& f, const_matrix_ref x, matrix_ref y) {
  detail::check_input(x, y, f.hidden(), "dense ffn");
  if (x.rows() == 0) return;
  std::vector<detail::job> jobs;
  jobs.push_back(detail::whole_batch_job(f, x));
  detail::run_jobs(jobs, x, y);
}

inline matrix dense_forward(const ffn& f, const_matrix_ref x) {
  matrix y(x.rows(), f.hidden());
  dense_forward(f, x, y);
  return y;
}

}  // namespace moeforge::runtime
