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
//   "panels": {"nr": 32, "weight_dtype": "BF16",
//              "tensors": {"layers.0.wq": [rows, depth, [cuts]], ...}}
// and each listed tensor holds [panels, depth, nr] values (F32 or BF16, in
// bf16_slot order) under the matrix's native name. The classifier is `lm_head`
// and the embedding `tok_emb` when the transformer keeps them apart (untied,
// or tied with the embedding in its stored type); otherwise `tok_emb` holds
// the tied classifier. Panel tensors come first in the file, from a 64-byte
// aligned data section, each a whole number of 64-byte rows (32 bytes for
// 16-row BF16 panels), so every one starts aligned for the kernel's loads.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "moeforge/io/native.hpp"

namespace moeforge::io {

namespace detail {

/// Calls on_panel(name, panel) for each panel of a packed model's layers,
/// named as the native format names the matrix it holds. `p` must be sized
/// for `structure` (every layer, expert and shared expert in place).
template <class Packed, class OnPanel>
void for_each_layer_panel(const model::weights& structure, Packed& p, OnPanel&& on_panel) {
  const auto ffn_panels = [&](const std::string& prefix, auto& f, bool gated) {
    if (gated) on_panel(prefix + ".gate", f.gate);
    on_panel(prefix + ".up", f.up);
    on_panel(prefix + ".down", f.down);
  };
  for (std::size_t li = 0; li < structure.layers.size(); ++li) {
    const auto& l = structure.layers[li];
    const std::string pre = cat("layers.", li);
    auto& a = p.attention[li];
    on_panel(pre + ".wq", a.wq);
    on_panel(pre + ".wk", a.wk);
    on_panel(pre + ".wv", a.wv);
    on_panel(pre + ".wo", a.wo);
    auto& f = p.ffn[li];
    if (const auto* d = std::get_if<ffn>(&l.ffn)) {
      ffn_panels(pre + ".ffn", f.shared[0], d->gated());
      continue;
    }
    const auto& m = std::get<moe_layer>(l.ffn);
    for (std::size_t e = 0; e < m.experts.size(); ++e)
      if (!m.experts[e].is_novice()) ffn_panels(cat(pre, ".moe.experts.", e), f.experts[e], m.experts[e].weights.gated());
    for (std::size_t s = 0; s < m.shared.size(); ++s) ffn_panels(cat(pre, ".moe.shared.", s), f.shared[s], m.shared[s].weights.gated());
  }
}

/// Throws value_error naming the tensor when a panel holds NaN or Inf. It
/// reads every page of the panels, which also faults the mapping in before
/// the first token needs it.
inline void require_finite_panels(const runtime::detail::panel_matrix& p, const std::string& what) {
  const std::size_t bytes = p.bytes();
  bool finite = true;
  if (p.type() == dtype::f32) {
    const float* v = static_cast<const float*>(p.storage());
    float sum = 0.0f;  // x - x is 0 for a finite x, NaN otherwise
#pragma omp parallel for reduction(+ : sum) schedule(static)
    for (std::size_t i = 0; i < bytes / 4; ++i) sum += v[i] - v[i];
    finite = sum == 0.0f;
  } else {
    const std::uint16_t* v = static_cast<const std::uint16_t*>(p.storage());
    std::uint16_t special = 0;  // any value whose exponent bits are all set
#pragma omp parallel for reduction(| : special) schedule(static)
    for (std::size_t i = 0; i < bytes / 2; ++i) special |= std::uint16_t((v[i] & 0x7f80) == 0x7f80);
    finite = special == 0;
  }
  if (!finite) throw value_error(what + ": the panels hold NaN or Inf");
}

}  // namespace detail

/// Writes what the owning transformer `t` runs as a packed model directory
/// `dir`, atomically (staged, then renamed into place). Loading it with
/// load_transformer in the same weight type gives a transformer that
/// computes what `t` does, bit for bit. A transformer whose MoE layers run
/// elsewhere (expert parallelism) holds no panels for them and is refused.
inline void save_packed(const model::transformer& t, const std::string& dir, const nlohmann::json& provenance = nlohmann::json::object(),
                        const native_save_options& opt = {}) {
  namespace fs = std::filesystem;
  using detail::cat;
  const model::weights& s = t.structure();
  const model::packed_weights& p = t.packed();
  if (t.collective()) throw config_error("save_packed: the transformer's MoE layers run on other processes; it holds no panels for them");
  model::validate(s, p);
  const fs::path out = output_path(dir);
  check_output_dir(out.string(), opt.overwrite);

  std::vector<std::pair<std::string, const runtime::detail::panel_matrix*>> panels;
  const bool apart = p.embedding.rows() != 0;
  panels.emplace_back(apart ? "lm_head" : "tok_emb", &p.classifier);
  if (apart) panels.emplace_back("tok_emb", &p.embedding);
  detail::for_each_layer_panel(s, p, [&](const std::string& name, const runtime::detail::panel_matrix& m) { panels.emplace_back(name, &m); });
  // Everything else (norms, biases, routers, novices, compensation) as F32
  // tensors; the slots the panels hold are the structure's empty matrices.
  std::vector<tensor_view> plain;
  detail::for_each_tensor(
      s, [&](const std::string& name, const matrix& m) { if (m.size()) plain.push_back({name, {m.rows(), m.cols()}, m.data()}); },
      [&](const std::string& name, const vector& v) { plain.push_back({name, {v.size()}, v.data()}); });

  nlohmann::json index = nlohmann::json::object();
  std::vector<tensor_info> infos;
  std::size_t offset = 0;
  const auto record = [&](const std::string& name, dtype type, std::vector<std::int64_t> shape) {
    std::size_t bytes = dtype_size(type);
    for (const auto d : shape) bytes *= std::size_t(d);
    infos.push_back({name, type, std::move(shape), offset, offset + bytes});
    offset += bytes;
  };
  for (const auto& [name, m] : panels) {
    index[name] = {m->rows(), m->depth(), m->cuts()};
    record(name, m->type(), {std::int64_t(m->panels()), m->depth(), runtime::detail::gemm_nr});
  }
  for (const auto& v : plain) record(v.name, dtype::f32, v.shape);
  const std::map<std::string, std::string> metadata{{"format", "pt"}, {"producer", "moeforge"}};
  // The data section starts 64-byte aligned in the file, so in its mapping.
  const std::size_t reserve = (detail::header_text(infos, metadata).size() + 8 + 63) / 64 * 64 - 8;

  nlohmann::json layers = nlohmann::json::array();
  for (const auto& l : s.layers) layers.push_back(detail::layer_json(l));
  detail::staging_dir stage(out);
  safetensors_writer w((stage.path() / native_tensors).string(), reserve, metadata);
  for (std::size_t i = 0; i < panels.size(); ++i) w.add_stored(infos[i].name, infos[i].shape, panels[i].second->storage(), infos[i].dtype);
  for (const auto& v : plain) w.add(v.name, v.shape, v.data);
  w.finish();
  const nlohmann::json extra{
      {"panels", {{"nr", runtime::detail::gemm_nr}, {"weight_dtype", std::string(dtype_name(p.classifier.type()))}, {"tensors", std::move(index)}}}};
  detail::write_manifest(stage.path(), s.config, std::move(layers), provenance, opt.attachments, extra);
  stage.commit(out);
}

/// Whether load_transformer maps `src`'s panels as they are: a packed
/// directory written with this build's panel width, run in the type its
/// panels hold (`format` empty: the file's).
inline bool maps_panels(const native_layers& src, const std::optional<runtime::detail::weight_format>& format) {
  return src.panel_width() == runtime::detail::gemm_nr && (!format || format->type == src.skeleton().weight_dtype);
}

/// The owning transformer of a packed directory whose panels it maps in
/// place (maps_panels must hold); `format` says only whether many-token BF16
/// products round their tokens. The panels are checked for shape and for
/// NaN/Inf; the mapping lives as long as the transformer.
inline model::transformer load_packed(const native_layers& src, const std::optional<runtime::detail::weight_format>& format = std::nullopt) {
  using detail::cat;
  if (!maps_panels(src, format))
    throw config_error(cat("load_packed: the directory's panels are ", src.panel_width(), " rows wide in ", dtype_name(src.skeleton().weight_dtype),
                           "; this build maps ", runtime::detail::gemm_nr, "-row panels in the type they hold (load_transformer repacks the others)"));
  const bool round_tokens = format ? format->round_tokens : true;
  model::weights s = src.skeleton();
  // Each FFN keeps only its shape (the manifest says whether it is gated);
  // then the values of everything that is not a panel.
  const auto shape_from_panels = [&](ffn& f, const std::string& prefix) {
    const panel_layout* up = src.panels(prefix + ".up");
    if (!up) throw format_error(cat(src.tensors().file(prefix + ".up"), ": '", prefix, ".up' is not stored as panels"));
    f.released = ffn_shape{up->depth, up->rows, f.gated()};
  };
  for (std::size_t li = 0; li < s.layers.size(); ++li) {
    const std::string pre = cat("layers.", li);
    if (auto* d = std::get_if<ffn>(&s.layers[li].ffn)) {
      shape_from_panels(*d, pre + ".ffn");
      continue;
    }
    auto& m = std::get<moe_layer>(s.layers[li].ffn);
    for (std::size_t e = 0; e < m.experts.size(); ++e)
      if (!m.experts[e].is_novice()) shape_from_panels(m.experts[e].weights, cat(pre, ".moe.experts.", e));
    for (std::size_t e = 0; e < m.shared.size(); ++e) shape_from_panels(m.shared[e].weights, cat(pre, ".moe.shared.", e));
  }
  detail::for_each_tensor(
      s, [&](const std::string& name, matrix& m) { src.panels(name) ? void(m = matrix()) : src.read(name, m); },
      [&](const std::string& name, vector& v) { src.read(name, v); });
  model::packed_weights p;
  p.attention.resize(s.layers.size());
  p.ffn.resize(s.layers.size());
  for (std::size_t li = 0; li < s.layers.size(); ++li) {
    auto& f = p.ffn[li];
    if (const auto* d = std::get_if<ffn>(&s.layers[li].ffn)) {
      f.shared.resize(1);
      f.shared[0].act = d->act;
      continue;
    }
    const auto& m = std::get<moe_layer>(s.layers[li].ffn);
    f.experts.resize(m.experts.size());
    f.shared.resize(m.shared.size());
    for (std::size_t e = 0; e < m.experts.size(); ++e) f.experts[e].act = m.experts[e].weights.act;
    for (std::size_t e = 0; e < m.shared.size(); ++e) f.shared[e].act = m.shared[e].weights.act;
  }
  std::vector<std::pair<std::string, runtime::detail::panel_matrix*>> views;
  const bool apart = src.panels("lm_head") != nullptr;
  views.emplace_back(apart ? "lm_head" : "tok_emb", &p.classifier);
  if (apart) views.emplace_back("tok_emb", &p.embedding);
  detail::for_each_layer_panel(s, p, [&](const std::string& name, runtime::detail::panel_matrix& m) { views.emplace_back(name, &m); });
  const auto& st = src.tensors();
  for (auto& [name, m] : views) {
    const panel_layout* l = src.panels(name);
    if (!l) throw format_error(cat(st.file(name), ": '", name, "' is not stored as panels"));
    try {
      *m = runtime::detail::panel_matrix::view(st.stored_bytes(name), st.storage(name), l->rows, l->depth, l->cuts,
                                               {st.info(name).dtype, round_tokens});
    } catch (const config_error& e) {
      throw format_error(cat(st.file(name), ": tensor '", name, "': ", e.what()));
    }
  }
  for (const auto& [name, m] : views) detail::require_finite_panels(*m, cat(st.file(name), ": tensor '", name, "'"));
  try {
    return model::transformer(std::move(s), std::move(p));
  } catch (const error& e) {
    throw format_error(cat(st.file(views.front().first), ": ", e.what()));
  }
}

}  // namespace moeforge::io
