// Which routed experts a layer read materialises: shared by every layer
// reader (native, Hugging Face, weights in memory).
#pragma once

#include <functional>

#include "moeforge/core/tensor.hpp"

namespace moeforge::io {

/// Which routed experts of a layer a read materialises. An expert with
/// !keep(e) is checked against the file's headers only and comes back
/// released (its shape, no weights: see release(ffn&)); its data are never
/// read, so an expert-parallel process reads only the experts it computes.
/// Empty: every expert. Novices (a vector each) are always read.
using expert_filter = std::function<bool(index_t expert)>;

}  // namespace moeforge::io
