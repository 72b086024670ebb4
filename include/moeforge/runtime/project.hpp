// x·Wᵀ, the one dense product the model needs outside the FFN kernel
// (attention projections, routers, the classifier), computed by the kernel's
// own panel product so that its arithmetic depends only on the shapes: every
// output element is one FMA chain over k, whichever thread computes it and
// whether W is row-major (packed per call) or prepared once as panels (F32
// or BF16). Eigen's GEMM does not promise that: inside a nested OpenMP region
// it may take its multi-threaded blocking even though it runs on one thread.
#pragma once

#include <vector>

#include "moeforge/runtime/gemm.hpp"

namespace moeforge::runtime {

namespace detail {

/// out = x·Wᵀ [T, rows] where block_of(r0, count) gives W's rows
/// [r0, r0 + count) as a panel_product operand; out is reshaped by
/// fit_matrix (its storage kept when it holds T·rows values). Output-row
/// tasks of whole panels run on the team when the product is large enough.
template <class Blocks>
inline void project_rows(const_matrix_ref x, index_t rows, Blocks block_of, matrix& out) {
  const index_t t = x.rows(), k = x.cols();
  const float* const x_end = x.data() + (t > 0 ? (t - 1) * x.outerStride() + k : 0);
  if (out.size() > 0 && x.data() < out.data() + out.size() && out.data() < x_end)
    throw config_error("projection: the output matrix shares storage with the input");
  moeforge::detail::fit_matrix(out, t, rows);
  if (t == 0 || rows == 0) return;
  std::vector<const float*> tokens(static_cast<std::size_t>(t));
  for (index_t p = 0; p < t; ++p) tokens[std::size_t(p)] = x.row(p).data();
  // Few tokens: narrow tasks, so both cores stream weights; many: wide ones,
  // which pass over the packed tokens fewer times.
  const index_t per_task = (t <= gemm_tokens_in_place ? 4 : 8) * gemm_nr;
  const index_t tasks = (rows + per_task - 1) / per_task;
  // Tokens every task rounds to BF16 pairs are rounded once, on the team.
  std::vector<pair_panel> panels;
  std::vector<std::uint32_t> own;
  std::uint32_t* const pairs = rounds_tokens({block_of(0, std::min(rows, gemm_nr))}, t) ? pair_scratch(token_pair_count(t, k), own) : nullptr;
  if (pairs) add_pair_panels(tokens.data(), t, k, pairs, panels);
  run_on_team(double(t) * double(rows) * double(k) >= min_parallel_fma && tasks > 1, [&] {
    pack_pair_panels(panels);
    for_each_task(tasks, [&](index_t task) {
      const index_t r0 = task * per_task, count = std::min(per_task, rows - r0);
      panel_product({block_of(r0, count)}, tokens.data(), t, k, out.data() + r0, out.outerStride(), pairs);
    });
  });
}

}  // namespace detail

/// out = x [T, in] · wᵀ [T, out] for row-major weights w [out, in]; out's
/// storage is reused when it holds as many values (a caller's buffer kept
/// across layers faults no fresh pages in). Throws config_error when out
/// shares storage with x.
inline void project(const_matrix_ref x, const matrix& w, matrix& out) {
  moeforge::detail::require_shape(x, x.rows(), w.cols(), "projection input");
  detail::project_rows(x, w.rows(), [&w](index_t r0, index_t count) { return detail::rows_of(w.middleRows(r0, count)); }, out);
}

/// The same for weights prepared as panels (F32 or BF16): identical results
/// to the row-major product of the same values.
inline void project(const_matrix_ref x, const detail::panel_matrix& w, matrix& out) {
  moeforge::detail::require_shape(x, x.rows(), w.depth(), "projection input");
  if (w.next_cut(0) != w.rows())  // its tasks are cut every few panels, not at the cuts
    throw shape_error("projection: the panels restart at a cut (a DualSparse layer's); project takes panels without cuts");
  detail::project_rows(x, w.rows(), [&w](index_t r0, index_t count) { return w.block(r0, count, 0); }, out);
}

/// x [T, in] · wᵀ → [T, out] for row-major weights w [out, in].
inline matrix project(const_matrix_ref x, const matrix& w) {
  matrix out;
  project(x, w, out);
  return out;
}

/// The same for prepared panels.
inline matrix project(const_matrix_ref x, const detail::panel_matrix& w) {
  matrix out;
  project(x, w, out);
  return out;
}

}  // namespace moeforge::runtime
