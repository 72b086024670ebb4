// x·Wᵀ, the one dense product the model needs outside the FFN kernel
// (attention projections, routers, the classifier), computed by the kernel's
// own panel product so that its arithmetic depends only on the shapes: every
// output element is one FMA chain over k, whichever thread computes it and
// whether W is row-major (packed per call) or prepared once as panels (F32
// or BF16). Eigen's GEMM does not promise that: inside a nested OpenMP region
// it may take its multi-threaded blocking even though it runs on one thread.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "moeforge/runtime/gemm.hpp"

namespace moeforge::runtime {

/// One product of project's input: weights [out, in], row-major (packed
/// per call) or prepared as panels (F32 or BF16), and the matrix its result
/// goes to.
class projection {
 public:
  projection(const matrix& w, matrix& out) : rows_(&w), out_(&out) {}
  /// Throws shape_error for panels that restart at a cut (project's tasks are
  /// cut every few panels, not at the cuts).
  projection(const detail::panel_matrix& w, matrix& out) : panels_(&w), out_(&out) {
    if (w.next_cut(0) != w.rows())
      throw shape_error("projection: the panels restart at a cut (a DualSparse layer's); project takes panels without cuts");
  }
  index_t outputs() const { return panels_ ? panels_->rows() : rows_->rows(); }
  /// Whether `m` holds these weights (row-major ones; panels are never a matrix).
  bool reads(const matrix& m) const { return rows_ == &m; }
  index_t depth() const { return panels_ ? panels_->depth() : rows_->cols(); }
  matrix& out() const { return *out_; }
  /// Weight rows [r0, r0 + count) as a panel_product operand.
  detail::weight_block block(index_t r0, index_t count) const {
    return panels_ ? panels_->block(r0, count, 0) : detail::rows_of(rows_->middleRows(r0, count));
  }

 private:
  const matrix* rows_ = nullptr;
  const detail::panel_matrix* panels_ = nullptr;
  matrix* out_;
};

/// out_i = x·W_iᵀ [T, rows_i] for each product of one input (attention's Q,
/// K and V): tokens its tasks pack (F32 panels or BF16 pairs) are packed
/// once for all of them, and every product's output-row tasks share one
/// parallel region (a region per product cost decode a start and a ragged
/// end each). Each out is reshaped by fit_matrix (its storage kept when it
/// holds as many values: a caller's buffer kept across layers faults no
/// fresh pages in). Results are those of one product at a time, bit for
/// bit. Throws, before any output is touched, shape_error when x's width is
/// not a product's depth, and config_error when an output shares storage
/// with x, is given twice or is a product's weights.
inline void project(const_matrix_ref x, std::initializer_list<projection> products) {
  const index_t t = x.rows(), k = x.cols();
  const float* const x_end = x.data() + (t > 0 ? (t - 1) * x.outerStride() + k : 0);
  for (auto p = products.begin(); p != products.end(); ++p) {
    moeforge::detail::require_shape(x, t, p->depth(), "projection input");
    const matrix& out = p->out();
    if (out.size() > 0 && x.data() < out.data() + out.size() && out.data() < x_end)
      throw config_error("projection: the output matrix shares storage with the input");
    if (std::any_of(products.begin(), p, [&](const projection& q) { return &q.out() == &out; }))
      throw config_error("projection: one output matrix is given for two products");
    if (std::any_of(products.begin(), products.end(), [&](const projection& q) { return q.reads(out); }))
      throw config_error("projection: an output matrix is a product's weights");
  }
  // Few tokens: narrow tasks, so both cores stream weights; many: wide ones,
  // which pass over the packed tokens fewer times.
  const index_t per_task = (t <= detail::gemm_tokens_in_place ? 4 : 8) * detail::gemm_nr;
  std::vector<index_t> first_task{0};  // product i's tasks: [first_task[i], first_task[i + 1])
  double fma = 0;
  std::vector<detail::token_form> forms;  // the forms the products read packed tokens in
  for (const auto& p : products) {
    const index_t rows = p.outputs();
    moeforge::detail::fit_matrix(p.out(), t, rows);
    first_task.push_back(first_task.back() + (t == 0 ? 0 : (rows + per_task - 1) / per_task));
    fma += double(t) * double(rows) * double(k);
    const auto form = rows > 0 ? detail::token_form_of({p.block(0, std::min(rows, detail::gemm_nr))}, t) : detail::token_form::in_place;
    if (form != detail::token_form::in_place && std::find(forms.begin(), forms.end(), form) == forms.end()) forms.push_back(form);
  }
  const index_t tasks = first_task.back();
  if (tasks == 0) return;
  std::vector<const float*> tokens(static_cast<std::size_t>(t));
  for (index_t r = 0; r < t; ++r) tokens[std::size_t(r)] = x.row(r).data();
  // Tokens that several tasks pack (as F32 panels or BF16 pairs) are packed once, on the team.
  std::vector<detail::token_panel_fill> fills;
  detail::token_storage storage;
  detail::prepacked_tokens packed;
  for (const auto form : forms) storage.add(tokens.data(), t, k, form, tasks > 1, packed, fills);
  storage.place();
  detail::run_on_team(fma >= detail::min_parallel_fma && tasks > 1, [&] {
    detail::pack_token_panels(fills);
    detail::for_each_task(tasks, [&](index_t task) {
      const std::size_t i = std::size_t(std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin()) - 1;
      const projection& p = products.begin()[i];
      const index_t r0 = (task - first_task[i]) * per_task, count = std::min(per_task, p.outputs() - r0);
      matrix& out = p.out();
      detail::panel_product({p.block(r0, count)}, tokens.data(), t, k, out.data() + r0, out.outerStride(), packed);
    });
  });
}

/// out = x [T, in] · wᵀ [T, out] for row-major weights w [out, in] (see the
/// list form above).
inline void project(const_matrix_ref x, const matrix& w, matrix& out) { project(x, {projection(w, out)}); }

/// The same for weights prepared as panels (F32 or BF16): identical results
/// to the row-major product of the same values.
inline void project(const_matrix_ref x, const detail::panel_matrix& w, matrix& out) { project(x, {projection(w, out)}); }

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
