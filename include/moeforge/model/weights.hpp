// A decoder-only transformer's configuration and weights as plain data. Each
// layer's FFN is either dense or an MoE layer. Loaders (io/) fill this; the
// forward pass (model/transformer.hpp) reads it.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "moeforge/core/moe.hpp"

namespace moeforge::model {

/// llama2.c rotates interleaved pairs (2j, 2j+1); Hugging Face rotates the
/// two halves of each head (rotate_half).
enum class rope_style { interleaved, half_split };

struct config {
  std::string arch = "llama";  ///< "llama2c", "llama", "mixtral", "qwen2_moe", ...
  index_t dim = 0;               ///< hidden size H
  index_t n_layers = 0;
  index_t n_heads = 0;
  index_t n_kv_heads = 0;
  index_t head_dim = 0;          ///< usually dim / n_heads
  index_t vocab_size = 0;
  index_t seq_len = 0;           ///< maximum context
  float norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  rope_style rope = rope_style::interleaved;
  bool tied_embeddings = true;
  std::int32_t bos_token = 1;
  std::int32_t eos_token = 2;
};

using layer_ffn = std::variant<ffn, moe_layer>;

struct layer {
  vector attn_norm;  ///< [H]
  vector ffn_norm;   ///< [H] post-attention RMSNorm
  matrix wq;         ///< [n_heads·head_dim, H]
  matrix wk;         ///< [n_kv_heads·head_dim, H]
  matrix wv;         ///< [n_kv_heads·head_dim, H]
  matrix wo;         ///< [H, n_heads·head_dim]
  vector bq, bk, bv; ///< optional attention biases (Qwen2); empty when absent
  layer_ffn ffn;
  /// The type the file stored each of this layer's tensors in, by its native
  /// name within the layer ("attn_norm", "wq", "moe.router.weight"; see
  /// io::detail::for_each_layer_tensor), where the loader recorded it: what a
  /// conversion writes the tensor back in (io::native_save_options::as_source).
  /// Empty for a layer built in memory.
  std::map<std::string, dtype> file_dtypes;
};

struct weights {
  model::config config;
  matrix tok_emb;  ///< [V, H]
  std::vector<layer> layers;
  vector final_norm;  ///< [H]
  matrix lm_head;     ///< [V, H]; empty when tied to tok_emb

  /// The type the weights were stored in (every value is exact in it): what
  /// an owning transformer runs them as unless told otherwise (run_dtype),
  /// and keeps the embedding in.
  dtype weight_dtype = dtype::f32;
  /// The type the weights are run as by default when it is not weight_dtype:
  /// a packed directory's panels' (io/packed.hpp), even where its weights are
  /// read back plain; BF16 for a file whose weight matrices the kernels read
  /// (attention projections, FFN and expert weights) are BF16 beside F32
  /// routers, classifier or embedding, which runs as a BF16 file does rather
  /// than in F32 at twice the memory (its F32 classifier rounded in its
  /// panels, its routers and embedding kept exact); empty otherwise. See
  /// run_dtype().
  std::optional<dtype> default_run_dtype;
  /// The type the source file stored the matrices in (F32, F16 or BF16),
  /// which a save keeps where it loses nothing (stored_dtype): F16 weights
  /// run as F32 (weight_dtype), and are written back as F16.
  dtype file_dtype = dtype::f32;
  /// The type the file stored each tensor outside the layers in ("tok_emb",
  /// "final_norm", "lm_head"), as layer::file_dtypes records a layer's.
  std::map<std::string, dtype> file_dtypes;

  /// What an owning transformer runs the weights as unless told otherwise.
  dtype run_dtype() const { return default_run_dtype.value_or(weight_dtype); }
  /// The type a save writes the matrices in when every value is exact in it
  /// (else F32): BF16 weights' own, else the source file's.
  dtype stored_dtype() const { return weight_dtype == dtype::bf16 ? dtype::bf16 : file_dtype; }
  const matrix& classifier() const { return config.tied_embeddings ? tok_emb : lm_head; }
};

/// Number of stored values of the model (embeddings, attention, norms, FFNs,
/// the classifier when untied).
inline index_t parameter_count(const weights& w) {
  index_t n = w.tok_emb.size() + w.final_norm.size() + w.lm_head.size();
  for (const auto& l : w.layers) {
    n += l.attn_norm.size() + l.ffn_norm.size() + l.wq.size() + l.wk.size() + l.wv.size() + l.wo.size() + l.bq.size() + l.bk.size() +
         l.bv.size();
    n += std::visit([](const auto& f) { return moeforge::parameter_count(f); }, l.ffn);
  }
  return n;
}

/// The FFN work a token asks for by configuration over the work of every
/// stored neuron, summed over the layers, in token_work's units (what
/// runtime::count_work counts and eval measures): 1 for a dense model; for
/// an MoE its shared experts, top_k routed widths (averaged, since experts
/// may differ; novices count 0) and its router. What eval measures when
/// nothing is dropped.
inline double active_ffn_fraction(const weights& w) {
  double active = 0, total = 0;
  for (const auto& l : w.layers) {
    if (const auto* f = std::get_if<ffn>(&l.ffn)) {
      active += double(f->intermediate()) * f->neuron_cost();
      total += double(f->intermediate()) * f->neuron_cost();
      continue;
    }
    const auto& m = std::get<moe_layer>(l.ffn);
    const moe_token_work unit = token_work(m);
    active += unit.shared + unit.routed * double(m.router.top_k) / double(m.experts.size()) + unit.router;
    total += unit.shared + unit.routed;
  }
  return total > 0 ? active / total : 1.0;
}

/// w's config, globals and weight type moved out, without its layers: what a
/// model built one layer at a time starts from.
inline weights take_globals(weights& w) {
  weights g;
  g.config = w.config;
  g.tok_emb = std::move(w.tok_emb);
  g.final_norm = std::move(w.final_norm);
  g.lm_head = std::move(w.lm_head);
  g.weight_dtype = w.weight_dtype;
  g.default_run_dtype = w.default_run_dtype;
  g.file_dtype = w.file_dtype;
  g.file_dtypes = w.file_dtypes;
  return g;
}

/// A model of one layer (a placeholder one-token vocabulary, tied): what the
/// transformer runs when the rest of the model is on disk.
inline weights layer_model(const config& c, layer l) {
  weights w;
  w.config = c;
  w.config.n_layers = 1;
  w.config.vocab_size = 1;
  w.config.tied_embeddings = true;
  w.tok_emb = matrix::Zero(1, c.dim);
  w.final_norm = vector::Ones(c.dim);
  w.layers.push_back(std::move(l));
  return w;
}

}  // namespace moeforge::model
