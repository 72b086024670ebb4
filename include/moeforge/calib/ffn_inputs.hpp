// Calibration data for layer-by-layer conversion: the calibration token
// windows, and each layer's FFN inputs from the model as converted so far.
#pragma once

#include <exception>
#include <functional>
#include <vector>

#include "moeforge/model/eval.hpp"
#include "moeforge/model/transformer.hpp"

namespace moeforge::calib {

/// The first `tokens` tokens of `stream` (BOS-prefixed, as eval encodes text)
/// as windows of `ctx` (the last one shorter when `tokens % ctx != 0`).
/// Throws config_error when the stream is shorter than requested.
inline std::vector<std::vector<std::int32_t>> calibration_windows(const std::vector<std::int32_t>& stream, index_t ctx, index_t tokens) {
  if (tokens < 1) throw config_error(moeforge::detail::cat("calibration: ", tokens, " tokens requested, expected at least 1"));
  if (index_t(stream.size()) < tokens)
    throw config_error(moeforge::detail::cat("calibration: the text has only ", stream.size(), " tokens but ", tokens,
                                             " were requested (give a longer calibration text or fewer calibration tokens)"));
  const std::vector<std::int32_t> head(stream.begin(), stream.begin() + std::ptrdiff_t(tokens));
  if (ctx < 1) throw config_error(moeforge::detail::cat("calibration: ctx = ", ctx, ", expected at least 1"));
  std::vector<std::vector<std::int32_t>> out;
  for (std::size_t s = 0; s < head.size(); s += std::size_t(ctx))
    out.emplace_back(head.begin() + std::ptrdiff_t(s), head.begin() + std::ptrdiff_t(std::min(head.size(), s + std::size_t(ctx))));
  return out;
}

/// FFN inputs [sum of window lengths, H] of `layer` for `w` as it is now: each
/// window runs from an empty cache and stops after reporting that layer's input.
inline matrix ffn_inputs(const model::weights& w, index_t layer, const std::vector<std::vector<std::int32_t>>& windows) {
  const model::transformer tr(w);
  index_t total = 0;
  for (const auto& win : windows) total += index_t(win.size());
  matrix x(total, w.config.dim);
  std::vector<index_t> offset(windows.size() + 1, 0);
  for (std::size_t i = 0; i < windows.size(); ++i) offset[i + 1] = offset[i] + index_t(windows[i].size());
  // Windows write disjoint rows, so any thread count gives the same matrix.
  std::vector<std::exception_ptr> failure(windows.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (std::ptrdiff_t i = 0; i < std::ptrdiff_t(windows.size()); ++i) {
    try {
      model::kv_cache cache = tr.new_cache();
      model::forward_options opt;
      opt.stop_after_layer = layer;
      opt.on_ffn_input = [&](index_t l, const_matrix_ref in) {
        if (l == layer) x.middleRows(offset[std::size_t(i)], in.rows()) = in;
      };
      tr.forward(windows[std::size_t(i)], cache, opt);
    } catch (...) {
      failure[std::size_t(i)] = std::current_exception();
    }
  }
  for (const auto& f : failure)
    if (f) moeforge::detail::rethrow_in_context(f, "calibration forward pass failed: ");
  return x;
}

}  // namespace moeforge::calib
