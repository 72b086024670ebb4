// The one driver every conversion method runs on: it visits a model's layers
// in order, hands each visited layer its calibration inputs (from the model as
// transformed so far, or from the untouched model), reports progress, and
// lets the method replace the layer. CMoE visits dense layers; DualSparse and
// MoNE visit MoE layers.
#pragma once

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <variant>

#include "moeforge/model/weights.hpp"

namespace moeforge::convert {

/// The calibration inputs [T, H] of layer `l`'s FFN, computed by running the
/// model given (layers before l possibly already transformed) on the
/// calibration tokens, e.g. calib::ffn_inputs (the FFN-input hook and stop-after-layer).
using ffn_inputs_fn = std::function<matrix(const model::weights&, index_t layer)>;

/// Progress of a whole model: called when a stage of a layer starts —
/// "calibration", then the method's own stages — and with "done" when the
/// layer is finished.
struct layer_progress {
  index_t layer = 0, layers = 0;
  std::string stage;
  double seconds = 0;  ///< since the model's conversion started
};
using progress_fn = std::function<void(const layer_progress&)>;

/// Which layers a method transforms.
enum class layer_filter { dense, moe };

/// What the driver gives a method for one layer.
struct layer_visit {
  index_t layer = 0;
  model::layer_ffn& ffn;  ///< the method may replace it
  const matrix& inputs;   ///< calibration inputs of this layer's FFN
  std::function<void(const std::string& stage)> stage;  ///< reports that a stage starts
};

struct visit_options {
  layer_filter filter = layer_filter::moe;
  /// true: layer l calibrates on the model transformed up to l−1 (CMoE's
  /// protocol); false: on the untouched model's inputs.
  bool sequential = true;
  progress_fn progress;
};

inline bool matches(const model::layer_ffn& f, layer_filter filter) {
  return std::holds_alternative<ffn>(f) == (filter == layer_filter::dense);
}

/// Calls `method(visit)` for every layer that matches the filter, in layer
/// order; the time spent computing the inputs is passed as stage
/// "calibration". Returns how many layers were visited.
inline index_t visit_layers(model::weights& w, const ffn_inputs_fn& inputs, const visit_options& opt,
                            const std::function<void(layer_visit&, double calibration_seconds)>& method) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  auto now = [&] { return std::chrono::duration<double>(clock::now() - start).count(); };
  const index_t layers = index_t(w.layers.size());
  auto tell = [&](index_t l, const std::string& stage) {
    if (opt.progress) opt.progress(layer_progress{l, layers, stage, now()});
  };
  // Inputs from the untouched model need a copy of it once the first layer changes.
  std::optional<model::weights> original;
  if (!opt.sequential) original = w;
  index_t visited = 0;
  for (index_t l = 0; l < layers; ++l) {
    auto& f = w.layers[std::size_t(l)].ffn;
    if (!matches(f, opt.filter)) continue;
    tell(l, "calibration");
    const double t0 = now();
    const matrix x = inputs(original ? *original : w, l);
    layer_visit v{l, f, x, [&, l](const std::string& stage) { tell(l, stage); }};
    method(v, now() - t0);
    // The method computed the new layer in F32: its values need not be exact
    // in BF16, so the model runs as F32 unless told otherwise (a save still
    // keeps the file's type where every value is exact in it: stored_dtype).
    w.weight_dtype = dtype::f32;
    w.default_run_dtype.reset();  // nor is the source's (a packed directory's, a mixed file's BF16) the new model's
    tell(l, "done");
    ++visited;
  }
  return visited;
}

}  // namespace moeforge::convert
