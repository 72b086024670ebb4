// One entry point for every model file moeforge reads, chosen by the path.
#pragma once

#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <type_traits>

#include "moeforge/io/hf.hpp"
#include "moeforge/io/llama2c.hpp"
#include "moeforge/io/native.hpp"
#include "moeforge/io/packed.hpp"

namespace moeforge::io {

struct load_options {
  std::string config;  ///< config.json for a .safetensors file or index (default: the one beside it)
  /// load_transformer and distributed::expert_parallel's path constructor:
  /// called with each layer's index and F32 weights before it is packed, e.g.
  /// to set a drop policy (the layer must stay valid). In an expert-parallel
  /// load the routed experts other ranks compute arrive released (shape only).
  std::function<void(index_t, model::layer&)> on_layer = {};  // "= {}": `{config}` initialises the struct without -Wextra warnings
};

namespace detail {

enum class model_format { native, hf, llama2c };

/// Which reader `path` needs; throws naming the path when none fits.
inline model_format format_of(const std::string& path, const load_options& opt) {
  namespace fs = std::filesystem;
  const fs::file_type type = moeforge::detail::file_type_of(path, "model");
  if (type == fs::file_type::not_found) throw io_error(cat("model '", path, "' does not exist"));
  const fs::path p(path);
  if (type == fs::file_type::directory) {
    if (is_native_dir(path)) {
      if (!opt.config.empty()) throw config_error(cat("model '", path, "': --config applies to safetensors models, not moeforge directories"));
      return model_format::native;
    }
    if (is_hf_dir(path) || !opt.config.empty()) return model_format::hf;
    throw format_error(cat("model '", path, "': a directory with neither moeforge.json (native) nor config.json + model.safetensors (Hugging Face)"));
  }
  // Opening a FIFO or a device would wait or read forever.
  if (type != fs::file_type::regular) throw io_error(cat("model '", path, "' is neither a regular file nor a directory"));
  if (p.extension() == ".bin") {
    if (!opt.config.empty()) throw config_error(cat("model '", path, "': --config applies to safetensors models, not llama2.c checkpoints"));
    return model_format::llama2c;
  }
  if (p.extension() == ".safetensors" || p.filename() == "model.safetensors.index.json") return model_format::hf;
  throw format_error(cat("model '", path, "': expected a llama2.c .bin, a .safetensors file, a Hugging Face or a moeforge directory"));
}

}  // namespace detail

/// A model already in memory served like the file readers' layers (for a
/// llama2.c checkpoint, read whole, and for callers holding weights).
class weights_layers {
 public:
  explicit weights_layers(model::weights&& w) : w_(std::move(w)) {
    if (index_t(w_.layers.size()) != w_.config.n_layers)
      throw shape_error(detail::cat("model weights in memory (a llama2.c checkpoint or a caller's): ", w_.layers.size(), " layers, config says ",
                                    w_.config.n_layers));
  }
  const model::config& config() const { return w_.config; }
  index_t experts(index_t li) const {
    const auto* m = std::get_if<moe_layer>(&w_.layers[std::size_t(li)].ffn);
    return m ? m->num_experts() : 0;
  }
  /// The globals, moved out: call once, before the layers.
  model::weights globals() { return model::take_globals(w_); }
  /// Layer `li`, moved out (call once per layer); the experts `keep` refuses
  /// released. Its matrices are in memory already: a pool is not used.
  model::layer layer(index_t li, const expert_filter& keep = {}, moeforge::detail::matrix_pool* = nullptr) {
    model::layer l = std::move(w_.layers[std::size_t(li)]);
    if (auto* m = std::get_if<moe_layer>(&l.ffn); m && keep)
      for (index_t e = 0; e < m->num_experts(); ++e)
        if (!m->experts[std::size_t(e)].is_novice() && !keep(e)) moeforge::release(m->experts[std::size_t(e)].weights);
    return l;
  }
  void release() const {}

 private:
  model::weights w_;  ///< handed out piece by piece, as the file readers read theirs
};

/// Calls visit(reader) (an rvalue) with the layer reader `path` needs: native_layers,
/// hf_layers, or (llama2.c, read whole) weights_layers; each has config(),
/// experts(li), globals(), layer(li, keep) and release().
template <class Visit>
decltype(auto) with_layer_reader(const std::string& path, const load_options& opt, Visit&& visit) {
  switch (detail::format_of(path, opt)) {
    case detail::model_format::native: return visit(native_layers(path));
    case detail::model_format::hf: return visit(hf_layers(path, opt.config));
    case detail::model_format::llama2c: break;
  }
  return visit(weights_layers(load_llama2c(path)));
}

namespace detail {

template <class Source>
model::transformer transformer_from(Source& src, const load_options& opt, std::optional<runtime::detail::weight_format> format) {
  if constexpr (std::is_same_v<Source, native_layers>)
    if (!opt.on_layer && maps_panels(src, format)) return load_packed(src, format);
  model::weights globals = src.globals();
  src.release();
  // Each layer is read into the storage of the one packed before it. The
  // weight matrices of a Hugging Face or native layer are not read at all
  // unless on_layer needs their values: they are packed straight from the
  // mapped file.
  moeforge::detail::matrix_pool pool;
  unread_matrices unread;
  model::transformer t(
      std::move(globals),
      [&](index_t li) {
        unread.clear();
        model::layer l = [&] {
          if constexpr (std::is_same_v<Source, weights_layers>)
            return src.layer(li, {}, &pool);
          else
            return src.layer(li, {}, &pool, opt.on_layer ? nullptr : &unread);
        }();
        pool.clear();
        src.release();  // the layer's mapped pages would otherwise stay resident
        if (opt.on_layer) opt.on_layer(li, l);
        return l;
      },
      format, {}, pool.sink(), unread.lookup());
  unread.clear();  // checks the last layer's
  return t;
}

}  // namespace detail

/// Loads any model moeforge reads, chosen by the path: a llama2.c `.bin`
/// checkpoint, a moeforge native directory, a Hugging Face directory, or a
/// `.safetensors` file / `model.safetensors.index.json` with its config.json.
/// The weights are F32 in memory (4 bytes per weight, whatever the file
/// stores): to run a model, load_transformer needs less.
inline model::weights load_model(const std::string& path, const load_options& opt = {}) {
  switch (detail::format_of(path, opt)) {
    case detail::model_format::native: return load_native(path);
    case detail::model_format::hf: return load_hf(path, opt.config);
    case detail::model_format::llama2c: break;
  }
  return load_llama2c(path);
}

/// Loads any model load_model reads straight into an owning transformer that
/// runs its weights as `format` (default: weights::run_dtype(), the type the
/// file stores its weight matrices in; F32 or BF16). Hugging Face and native
/// models are read one layer at a time from their memory-mapped tensors: each
/// layer's weight matrices are packed straight from the file's bytes (F32, BF16
/// or F16), its other tensors read in F32, and its mapped pages released, so
/// loading needs the packed model plus a few pages of each layer (about one
/// layer in F32 with opt.on_layer, which is handed every value; two for a
/// moment where a layer of another kind follows), a BF16 model about its file
/// size, and never the whole model in F32. A llama2.c checkpoint (F32 only) is
/// read whole first. The result is the same, bit for bit, as
/// model::transformer(load_model(path, opt), format). A packed directory
/// (io/packed.hpp) of this build's panel width, run in the type its panels hold
/// and without opt.on_layer, is not read at all: its panels are mapped in place
/// (load_packed) and it runs what the transformer that wrote it ran; read
/// plain, it runs the same (weights::run_dtype: by default in its panels'
/// type). Safe to call from several processes on one file (it only reads).
inline model::transformer load_transformer(const std::string& path, const load_options& opt = {},
                                           std::optional<runtime::detail::weight_format> format = std::nullopt) {
  return with_layer_reader(path, opt, [&](auto&& src) { return detail::transformer_from(src, opt, format); });
}

}  // namespace moeforge::io
