// Packed model directories: a native directory (native.hpp) whose weight
// matrices are stored as the kernel's panels, exactly as an owning
// transformer holds them in memory. Loading one with this build's panel width
// maps the panels in place instead of reading, widening and packing every
// matrix: a model in the page cache starts in the time it takes to map and
// check it, and its panels are the page cache's pages (resident once however
// many processes run it). Every other reader sees an ordinary native model:
// load_model, conversions and builds of another panel width unpack the panels.
//
// The manifest gains
//   "panels": {"nr": 32, "type": "BF16", "weight_dtype": "F32", "file_dtype": "F16",
//              "tensors": {"layers.0.wq": [rows, depth, [cuts]], ...}}
// (the panel width, the type the panels hold and the model is run as, the type
// the weights were stored in, the type the model's source file stored them in —
// which exports and conversions write, the rest of the directory being F32 —
// absent in directories written before it, and every matrix the kernels read:
// no more, no fewer), and each listed tensor holds [panels, depth, nr] values
// in bf16_slot order under the matrix's native name. The classifier is
// `lm_head` and the embedding `tok_emb` (in the stored type) when the
// transformer keeps them apart (untied, or tied but run in another type);
// otherwise `tok_emb` holds the tied classifier. Panel tensors come first in
// the file, from a 64-byte aligned data section, each a whole number of
// panel rows, so each starts on a cache line (AVX-512) or half of one (AVX2).
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "moeforge/io/native.hpp"

namespace moeforge::io {

namespace detail {

/// Throws value_error naming the tensor and the first non-finite value when
/// a panel holds NaN or Inf. It reads every page of the panels (across the
/// team), which also faults a mapping in before the first token needs it.
inline void require_finite_panels(const runtime::detail::panel_matrix& p, const std::string& what) {
  const std::size_t values = p.bytes() / dtype_size(p.type()), block = std::size_t(1) << 20;
  const std::ptrdiff_t blocks = std::ptrdiff_t((values + block - 1) / block);
  bool finite = true;
#pragma omp parallel for reduction(&& : finite) schedule(static)
  for (std::ptrdiff_t b = 0; b < blocks; ++b) {
    const std::size_t first = std::size_t(b) * block, n = std::min(block, values - first);
    if (p.type() == dtype::f32) {
      finite = finite && moeforge::detail::all_finite(Eigen::Map<const Eigen::VectorXf>(static_cast<const float*>(p.storage()) + first, index_t(n)));
    } else {
      const std::uint16_t* v = static_cast<const std::uint16_t*>(p.storage()) + first;
      unsigned special = 0;  // BF16 values whose exponent bits are all set
      for (std::size_t i = 0; i < n; ++i) special += (v[i] & 0x7f80u) == 0x7f80u;
      finite = finite && special == 0;
    }
  }
  if (finite) return;
  std::vector<float> row(std::size_t(p.depth()));
  for (index_t r = 0; r < p.rows(); ++r) {
    p.row_values(r, 0, p.depth(), row.data());
    for (index_t k = 0; k < p.depth(); ++k)
      if (!std::isfinite(row[std::size_t(k)])) throw moeforge::detail::non_finite_error(what, row[std::size_t(k)], r, k);
  }
  throw value_error(what + ": non-finite values in the panels' padding (past the last row)");
}

/// The classifier and embedding panels under their tensor names (see the top of this file).
template <class Packed>
std::vector<std::pair<std::string, decltype(&std::declval<Packed&>().classifier)>> global_panels(Packed& p, bool apart) {
  if (!apart) return {{"tok_emb", &p.classifier}};
  return {{"lm_head", &p.classifier}, {"tok_emb", &p.embedding}};
}

/// A tied model whose classifier is kept apart (BF16 panels beside F32
/// embedding panels of the same shape, checked before) must hold the
/// embedding's values rounded, or the mapped transformer and one built from
/// the plain weights (`lm_head` is not read: it is tied) would differ. Both
/// have the same panel layout, so the comparison runs down their storage.
inline void require_tied(const runtime::detail::panel_matrix& classifier, const runtime::detail::panel_matrix& embedding, const std::string& file) {
  using runtime::detail::gemm_nr;
  const auto* c = static_cast<const std::uint16_t*>(classifier.storage());
  const auto* e = static_cast<const float*>(embedding.storage());
  const std::ptrdiff_t rows = std::ptrdiff_t(classifier.bytes() / 2 / std::size_t(gemm_nr));  // panel rows: NR values at one depth
  bool same = true;
#pragma omp parallel for reduction(&& : same) schedule(static)
  for (std::ptrdiff_t r = 0; r < rows; ++r)
    for (index_t slot = 0; slot < gemm_nr; ++slot)
      same = same && c[r * gemm_nr + slot] == f32_to_bf16(e[r * gemm_nr + runtime::detail::bf16_row(slot)]);
  if (!same) throw format_error(cat(file, ": the model is tied, but 'lm_head' does not hold the values of 'tok_emb' rounded to BF16"));
}

}  // namespace detail

/// Writes what the owning transformer `t` runs as a packed model directory
/// `dir`, atomically (staged, then renamed into place). Loading it with
/// load_transformer, in the type its panels hold and with the same
/// weight_format::round_tokens (true unless asked otherwise), gives a
/// transformer that computes what `t` does, bit for bit. A transformer whose
/// MoE layers run elsewhere (expert parallelism) holds no panels for them and
/// is refused.
inline void save_packed(const model::transformer& t, const std::string& dir, const nlohmann::json& provenance = nlohmann::json::object(),
                        const native_save_options& opt = {}) {
  namespace fs = std::filesystem;
  using detail::cat;
  if (t.runs_moe_elsewhere())
    throw config_error("save_packed: some MoE layers of the transformer run outside it (expert parallelism); it holds no panels for them");
  const model::weights& s = t.structure();
  const model::packed_weights& p = t.packed();
  model::validate(s, p);
  const fs::path out = output_path(dir);
  check_output_dir(out.string(), opt.overwrite);

  auto panels = detail::global_panels(p, p.embedding.rows() != 0);
  detail::for_each_layer_panel(s, p, [&](const std::string& name, const runtime::detail::panel_matrix& m) { panels.emplace_back(name, &m); });
  // Everything else (norms, biases, routers, novices, compensation) as F32 tensors.
  const std::vector<tensor_view> plain = detail::tensor_views(s, dtype::f32);

  nlohmann::json index = nlohmann::json::object();
  std::vector<tensor_info> infos;
  for (const auto& [name, m] : panels) {
    index[name] = {m->rows(), m->depth(), m->cuts()};
    infos.push_back({name, m->type(), {std::int64_t(m->panels()), m->depth(), runtime::detail::gemm_nr}, 0, 0});
  }
  for (const auto& v : plain) infos.push_back({v.name, v.stored, v.shape, 0, 0});
  detail::assign_offsets((out / native_tensors).string(), infos);
  const std::map<std::string, std::string> metadata{{"format", "pt"}, {"producer", "moeforge"}};
  // The data section starts 64-byte aligned in the file, so in its mapping.
  const std::size_t reserve = (detail::header_text(infos, metadata).size() + 8 + 63) / 64 * 64 - 8;

  nlohmann::json layers = nlohmann::json::array();
  for (const auto& l : s.layers) layers.push_back(detail::layer_json(l));
  detail::staging_dir stage(out);
  safetensors_writer w((stage.path() / native_tensors).string(), reserve, metadata);
  for (std::size_t i = 0; i < panels.size(); ++i) w.add_stored(infos[i].name, infos[i].shape, panels[i].second->storage(), infos[i].dtype);
  for (const auto& v : plain) w.add(v.name, v.shape, v.data, v.stored);
  w.finish();
  const nlohmann::json extra{{"panels",
                              {{"nr", runtime::detail::gemm_nr},
                               {"type", std::string(dtype_name(p.classifier.type()))},
                               {"weight_dtype", std::string(dtype_name(s.weight_dtype))},
                               {"file_dtype", std::string(dtype_name(s.file_dtype))},
                               {"tensors", std::move(index)}}}};
  detail::write_manifest(stage.path(), s.config, std::move(layers), provenance, opt.attachments, extra);
  stage.commit(out, opt.overwrite);
}

/// Whether load_transformer maps `src`'s panels as they are: a packed
/// directory written with this build's panel width, run in the type its
/// panels hold (`format` empty: that type), every panel tensor aligned to its
/// values (as save_packed writes them; another writer may not).
inline bool maps_panels(const native_layers& src, const std::optional<runtime::detail::weight_format>& format) {
  if (src.panel_width() != runtime::detail::gemm_nr || (format && format->type != src.skeleton().run_dtype())) return false;
  for (const auto& name : src.tensors().names())
    if (src.panels(name) && reinterpret_cast<std::uintptr_t>(src.tensors().stored_bytes(name)) % dtype_size(src.tensors().info(name).dtype) != 0)
      return false;
  return true;
}

/// The owning transformer of a packed directory whose panels it maps in
/// place (maps_panels must hold; `format` says only whether many-token BF16
/// products round their tokens). The panels are checked for shape, type,
/// cuts and NaN/Inf; the mapping lives as long as the transformer.
inline model::transformer load_packed(const native_layers& src, const std::optional<runtime::detail::weight_format>& format = std::nullopt) {
  using detail::cat;
  if (!maps_panels(src, format))
    throw config_error(cat("load_packed: the directory's panels are ", src.panel_width(), " rows wide in ", dtype_name(src.skeleton().run_dtype()),
                           "; this build maps aligned ", runtime::detail::gemm_nr,
                           "-row panels in the type they hold (load_transformer repacks the others)"));
  const bool round_tokens = format.value_or(runtime::detail::weight_format()).round_tokens;
  model::weights s = src.skeleton();
  model::packed_weights p = detail::panel_slots(s);
  // Each FFN keeps only its shape (the manifest says whether it is gated);
  // then the values of everything that is not a panel.
  detail::for_each_ffn_slot(s, p, [&](const std::string& prefix, ffn& f, runtime::detail::packed_ffn&) {
    const panel_layout* up = src.panels(prefix + ".up");
    f.released = ffn_shape{up->depth, up->rows, f.gated()};
  });
  detail::for_each_tensor(
      s, [&](const std::string& name, matrix& m) { src.panels(name) ? void(m = matrix()) : src.read(name, m); },
      [&](const std::string& name, vector& v) { src.read(name, v); });
  auto views = detail::global_panels(p, src.embedding_apart());
  detail::for_each_layer_panel(s, p, [&](const std::string& name, runtime::detail::panel_matrix& m) { views.emplace_back(name, &m); });
  const auto& st = src.tensors();
  for (auto& [name, m] : views) {
    const panel_layout* l = src.panels(name);
    *m = runtime::detail::panel_matrix::view(st.stored_bytes(name), st.storage(name), l->rows, l->depth, l->cuts,
                                             {st.info(name).dtype, round_tokens});
  }
  try {
    model::validate(s, p);
  } catch (const error& e) {
    throw format_error(cat(st.file(views.front().first), ": ", moeforge::detail::reason(e)));
  }
  for (const auto& [name, m] : views) detail::require_finite_panels(*m, cat(st.file(name), ": tensor '", name, "'"));
  if (s.config.tied_embeddings && p.embedding.rows()) detail::require_tied(p.classifier, p.embedding, st.file("lm_head"));
  return model::transformer(std::move(s), std::move(p));
}

}  // namespace moeforge::io
