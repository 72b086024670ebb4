// An FFN's weights in the kernel's panel order (see panel_matrix), built once
// by runtime::prepare so the GEMM path never repacks them per call and the
// few-token path streams them as whole panels.
#pragma once

#include <functional>
#include <vector>

#include "moeforge/core/moe.hpp"
#include "moeforge/runtime/gemm.hpp"

namespace moeforge::runtime::detail {

struct packed_ffn {
  panel_matrix gate;  ///< neurons × H, panels restarting at the cuts; empty for ungated FFNs
  panel_matrix up;    ///< neurons × H, panels restarting at the cuts
  panel_matrix down;  ///< H × neurons
  activation act = activation::silu;

  bool gated() const { return gate.rows() != 0; }
};

/// Where a layer's weight matrices are packed from: each matrix's own values
/// when not given; a loader that handed matrices out unread answers with
/// their file's bytes (io::load_transformer), others with the matrix itself.
using rows_lookup = std::function<weight_rows(const matrix&)>;

inline weight_rows source_of(const matrix& m, const rows_lookup& where = {}) {
  return where ? where(m) : weight_rows{m.data(), dtype::f32, m.outerStride(), {}};
}

/// Packs f in `format` (F32 or BF16 values); neuron panels restart at `cuts`
/// (a DualSparse expert's major width), so jobs that start there read whole
/// panels. The values come from where `where` says (see rows_lookup).
inline packed_ffn pack_ffn(const ffn& f, const std::vector<index_t>& cuts, weight_format format = {}, const rows_lookup& where = {}) {
  packed_ffn p;
  if (f.gated()) p.gate = panel_matrix(source_of(f.gate, where), f.gate.rows(), f.gate.cols(), cuts, format);
  p.up = panel_matrix(source_of(f.up, where), f.up.rows(), f.up.cols(), cuts, format);
  p.down = panel_matrix(source_of(f.down, where), f.down.rows(), f.down.cols(), {}, format);
  p.act = f.act;
  return p;
}

/// A learned router's matrices as F32 panels, the router's own values (its
/// scores are the plain router's, bit for bit), packed once where the layer
/// is prepared: scoring then streams them as the experts are streamed instead
/// of packing the router on every call. Scoring a decoded token took
/// Qwen3-30B-A3B's 128 x 2048 router 59-71 us so against 20-24 us from
/// panels (its BF16 layer: ~1 ms), DeepSeek-V2-Lite's 64 x 2048 25-35 us
/// against 10-14; routers of 7-8 experts gain little (7-19 us either way).
/// A matrix the router does not have stays empty, and so do all of an
/// oracle router's. A matrix whose values are all BF16 values (a BF16
/// checkpoint's router, widened on load) is packed as BF16 read with F32
/// tokens (weight_format's exact path): the same scores from half the bytes.
struct packed_router {
  panel_matrix weight, weight_up, projection, weight_quad;
};

inline packed_router pack_router(const router& r) {
  if (r.kind == router_kind::oracle) return {};
  const auto pack = [](const matrix& m) {
    if (!m.size()) return panel_matrix();
    const bool bf16 = exact_in_bf16(m.data(), std::size_t(m.size()));
    return panel_matrix(m.data(), m.outerStride(), m.rows(), m.cols(), {}, bf16 ? weight_format(dtype::bf16, false) : weight_format());
  };
  return {pack(r.weight), pack(r.weight_up), pack(r.projection), pack(r.weight_quad)};
}

/// The panels of a MoE layer's experts (one per expert; a novice's empty)
/// and shared experts, or of a dense FFN as its one shared expert. When
/// major-only pairs can occur (a partitioned expert, an explicit major width,
/// a 2t policy), a routed expert's panels restart at its major width, where
/// the minor part's jobs begin; any other width a plan asks for also works,
/// from inside a panel.
struct packed_layer {
  std::vector<packed_ffn> experts, shared;
  /// Built from the layer's router wherever the layer is packed; never
  /// stored (a packed model directory holds the router in its structure).
  packed_router router;
};

/// Where routed expert e's gate and up panels restart: at its major width
/// when major-only pairs can occur.
inline std::vector<index_t> expert_cuts(const moe_layer& m, std::size_t e) {
  const auto& ex = m.experts[e];
  const bool major = m.router.drop.kind == drop_kind::two_t || ex.major > 0 || !ex.parts.empty();
  return major ? std::vector<index_t>{ex.major_width()} : std::vector<index_t>{};
}

/// Routed expert e's panels in a packed_layer (a novice's are empty).
inline packed_ffn pack_expert(const moe_layer& m, std::size_t e, weight_format format = {}, const rows_lookup& where = {}) {
  return m.experts[e].is_novice() ? packed_ffn{} : pack_ffn(m.experts[e].weights, expert_cuts(m, e), format, where);
}

inline packed_layer pack_layer(const moe_layer& m, weight_format format = {}) {
  packed_layer p;
  for (std::size_t e = 0; e < m.experts.size(); ++e) p.experts.push_back(pack_expert(m, e, format));
  for (const auto& s : m.shared) p.shared.push_back(pack_ffn(s.weights, {}, format));
  p.router = pack_router(m.router);
  return p;
}

}  // namespace moeforge::runtime::detail
