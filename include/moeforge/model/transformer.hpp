// The decoder-only transformer forward pass (RMSNorm, RoPE, grouped-query
// attention with a KV cache) whose FFNs run on the dense or MoE kernel.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "moeforge/detail/mul_add.hpp"
#include "moeforge/model/weights.hpp"
#include "moeforge/runtime/dense_ffn.hpp"
#include "moeforge/runtime/moe_ffn.hpp"
#include "moeforge/runtime/project.hpp"

namespace moeforge::model {

/// Keys and values of every layer for positions [0, length).
struct kv_cache {
  /// Per layer [n_kv_heads, capacity·head_dim]: each kv head's keys
  /// (values) for positions 0, 1, … one after another, so decoding reads a
  /// head's cache as one sequential stream (position-major rows, one head's
  /// 512 bytes every 16 KiB on llama-7b, ran a 1024-token context at a
  /// quarter of the bandwidth); the capacity grows as positions arrive.
  std::vector<matrix> k;
  std::vector<matrix> v;
  index_t length = 0;
};

/// Where a forward pass spends its time (seconds, summed over calls): what a
/// whole-model benchmark reports as each part's share of a token.
struct stage_times {
  double attention = 0;  ///< norms, q/k/v/o projections, RoPE, attention itself
  double ffn = 0;        ///< FFN norm, router and the dense or MoE FFN
  double head = 0;       ///< embedding lookup, final norm and classifier
  double total() const { return attention + ffn + head; }
};

struct forward_options {
  /// Called with each layer's FFN input (the post-attention RMSNorm output,
  /// [T, H]) before the FFN runs: the calibration hook.
  std::function<void(index_t layer, const_matrix_ref ffn_input)> on_ffn_input;
  /// Stop right after reporting this layer's FFN input (no logits are
  /// computed); -1 runs the whole model. Any other value is refused (config_error).
  index_t stop_after_layer = -1;
  /// Compute logits for every position (prefill for perplexity) or only the last.
  bool all_logits = true;
  /// Called with the work each layer's FFN does on this batch (after any
  /// DualSparse dropping): realised drop rate and active fraction.
  std::function<void(index_t layer, const runtime::route_stats&)> on_route;
  /// When set, each stage's wall time is added to it.
  stage_times* times = nullptr;
};

/// Throws config_error unless the config describes a model the forward pass runs.
inline void validate(const config& c) {
  using moeforge::detail::cat;
  if (c.dim <= 0 || c.n_layers <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 || c.head_dim <= 0 || c.vocab_size <= 0 || c.seq_len <= 0)
    throw config_error("model config: dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size and seq_len must be positive");
  if (c.n_heads % c.n_kv_heads != 0)
    throw config_error(cat("model config: n_heads ", c.n_heads, " is not a multiple of n_kv_heads ", c.n_kv_heads));
  if (c.head_dim % 2 != 0) throw config_error(cat("model config: head_dim ", c.head_dim, " must be even for RoPE"));
  // A theta of 0 or below makes NaN rotations, and one that overflows a float
  // (inf) silently stops rotating every pair but the first.
  if (!(std::isfinite(c.rope_theta) && c.rope_theta > 0))
    throw config_error(cat("model config: rope_theta is ", c.rope_theta, ", expected a finite value above 0"));
  if (!(std::isfinite(c.norm_eps) && c.norm_eps >= 0))
    throw config_error(cat("model config: norm_eps is ", c.norm_eps, ", expected a finite value of 0 or more"));
}

/// A layer's attention projections as panels.
struct attention_panels {
  runtime::detail::panel_matrix wq, wk, wv, wo;
};

/// Checks layer i's norms and biases and calls check(plain, panels, rows,
/// cols, what) with each attention projection's slot (in layer, in
/// attention_panels) and the shape it must have; returns the layer's name.
template <class Check>
std::string check_attention_shapes(const config& c, const layer& l, std::size_t i, Check&& check) {
  using moeforge::detail::require_shape;
  const index_t q = c.n_heads * c.head_dim, kv = c.n_kv_heads * c.head_dim;
  const std::string name = moeforge::detail::cat("model.layers[", i, "]");
  require_shape(l.attn_norm, c.dim, 1, name + ".attn_norm");
  require_shape(l.ffn_norm, c.dim, 1, name + ".ffn_norm");
  check(&layer::wq, &attention_panels::wq, q, c.dim, name + ".wq");
  check(&layer::wk, &attention_panels::wk, kv, c.dim, name + ".wk");
  check(&layer::wv, &attention_panels::wv, kv, c.dim, name + ".wv");
  check(&layer::wo, &attention_panels::wo, c.dim, q, name + ".wo");
  if (l.bq.size()) require_shape(l.bq, q, 1, name + ".bq");
  if (l.bk.size()) require_shape(l.bk, kv, 1, name + ".bk");
  if (l.bv.size()) require_shape(l.bv, kv, 1, name + ".bv");
  return name;
}

/// validate(moe_layer) and the layer's hidden size against the config.
inline void validate_moe(const config& c, const moe_layer& m, const std::string& name, bool routed_may_be_released, bool shared_may_be_released) {
  moeforge::validate(m, name + ".moe", routed_may_be_released, shared_may_be_released);
  if (m.hidden() != c.dim) throw shape_error(moeforge::detail::cat(name, ".moe: hidden size ", m.hidden(), ", expected ", c.dim));
}

/// Throws shape_error / config_error naming the part of layer `i` that does
/// not fit the config (see validate(moe_layer) on `routed_may_be_released`).
inline void validate(const config& c, const layer& l, std::size_t i, bool routed_may_be_released = false) {
  const std::string name = check_attention_shapes(
      c, l, i, [&l](matrix layer::*plain, auto, index_t rows, index_t cols, const std::string& what) {
        moeforge::detail::require_shape(l.*plain, rows, cols, what);
      });
  if (const auto* f = std::get_if<ffn>(&l.ffn))
    moeforge::validate(*f, name + ".ffn", c.dim);
  else
    validate_moe(c, std::get<moe_layer>(l.ffn), name, routed_may_be_released, false);
}

/// The config and the tensors outside the layers (embedding, final norm, classifier).
inline void validate_globals(const weights& w) {
  const auto& c = w.config;
  validate(c);
  moeforge::detail::require_shape(w.tok_emb, c.vocab_size, c.dim, "model.tok_emb");
  moeforge::detail::require_shape(w.final_norm, c.dim, 1, "model.final_norm");
  if (!c.tied_embeddings) moeforge::detail::require_shape(w.lm_head, c.vocab_size, c.dim, "model.lm_head");
}

/// Throws shape_error / config_error naming the part of the model that does
/// not fit its config.
inline void validate(const weights& w) {
  validate_globals(w);
  if (index_t(w.layers.size()) != w.config.n_layers)
    throw shape_error(moeforge::detail::cat("model: ", w.layers.size(), " layers, config says ", w.config.n_layers));
  for (std::size_t i = 0; i < w.layers.size(); ++i) validate(w.config, w.layers[i], i);
}

/// What an owning transformer runs: every weight matrix of the model as the
/// kernel's panels (the rest is in its structure()). A packed model directory
/// stores exactly this (io/packed.hpp), so loading one maps it instead of
/// packing; all but the routers' panels, which are small and packed again
/// from the structure's routers when the transformer is made.
struct packed_weights {
  runtime::detail::panel_matrix classifier;          ///< [V, H] in the run type
  runtime::detail::panel_matrix embedding;           ///< [V, H] in the stored type; empty when the classifier's values serve
  std::vector<attention_panels> attention;           ///< per layer
  std::vector<runtime::detail::packed_layer> ffn;    ///< per layer; a dense FFN is its one shared expert
};

/// Whether an owning transformer running weights stored as `stored` in `run`
/// looks tokens up in its classifier's panels (tied, and the values the same)
/// rather than in an embedding of its own in the stored type.
inline bool classifier_embeds(const config& c, dtype run, dtype stored) { return c.tied_embeddings && (run == dtype::f32 || stored == dtype::bf16); }

/// Panels of `rows` × `depth` values of type `type` restarting at `cuts`.
inline void require_panels(const runtime::detail::panel_matrix& p, index_t rows, index_t depth, dtype type, const std::string& what,
                           const std::vector<index_t>& cuts = {}) {
  using moeforge::detail::cat;
  if (p.rows() != rows || p.depth() != depth)
    throw shape_error(cat(what, ": panels of [", p.rows(), ", ", p.depth(), "], expected [", rows, ", ", depth, "]"));
  if (p.type() != type) throw config_error(cat(what, ": ", dtype_name(p.type()), " panels, expected ", dtype_name(type)));
  const auto want = runtime::detail::panel_matrix::kept_cuts(cuts, rows);
  if (p.cuts() != want) {
    const auto list = [](const std::vector<index_t>& v) {
      std::string text = "[";
      for (std::size_t i = 0; i < v.size(); ++i) text += cat(i ? ", " : "", v[i]);
      return text + "]";
    };
    throw shape_error(cat(what, ": panels restart at rows ", list(p.cuts()), ", the runtime packs them restarting at ", list(want)));
  }
}

/// A released FFN's panels against the shape it records; gate and up restart at `cuts`.
inline void require_panels(const runtime::detail::packed_ffn& p, const ffn& f, dtype type, const std::string& what,
                           const std::vector<index_t>& cuts = {}) {
  if (!f.released) throw config_error(what + ": the structure of a packed model holds FFN shapes, not weights");
  const index_t h = f.hidden(), n = f.intermediate();
  if (p.act != f.act) throw config_error(what + ": the panels' activation is not the structure's");
  if (f.gated())
    require_panels(p.gate, n, h, type, what + ".gate", cuts);
  else if (p.gated())
    throw shape_error(what + ": gate panels for an ungated FFN");
  require_panels(p.up, n, h, type, what + ".up", cuts);
  require_panels(p.down, h, n, type, what + ".down");
}

/// Throws shape_error / config_error unless `p` holds exactly the panels an
/// owning transformer of `structure` (weights whose matrices were released:
/// config, norms, biases, routers, novices, compensation and FFN shapes)
/// builds and runs: shapes, types (the classifier's for every layer) and
/// the cuts it packs them with.
inline void validate(const weights& structure, const packed_weights& p) {
  using moeforge::detail::cat;
  const auto& c = structure.config;
  validate(c);
  const dtype run = p.classifier.type();
  moeforge::detail::require_shape(structure.final_norm, c.dim, 1, "model.final_norm");
  if (structure.tok_emb.size() || structure.lm_head.size()) throw config_error("packed model: the structure must not hold the embedding or classifier");
  if (structure.default_run_dtype && *structure.default_run_dtype != run)
    throw config_error(cat("packed model: the structure says ", dtype_name(*structure.default_run_dtype),
                           " panels (its default run type), the classifier's are ", dtype_name(run)));
  require_panels(p.classifier, c.vocab_size, c.dim, run, "model.classifier");
  if (classifier_embeds(c, run, structure.weight_dtype) != (p.embedding.rows() == 0))
    throw config_error(cat("packed model: a ", c.tied_embeddings ? "tied" : "untied", " model run as ", dtype_name(run), " from ",
                           dtype_name(structure.weight_dtype), " weights ", p.embedding.rows() ? "must have no" : "needs", " embedding panels of its own"));
  if (p.embedding.rows()) require_panels(p.embedding, c.vocab_size, c.dim, structure.weight_dtype, "model.tok_emb");
  const std::size_t n = std::size_t(c.n_layers);
  if (structure.layers.size() != n || p.attention.size() != n || p.ffn.size() != n)
    throw shape_error(cat("packed model: ", structure.layers.size(), " layers, ", p.attention.size(), " of attention panels and ", p.ffn.size(),
                          " of FFN panels; config says ", n));
  for (std::size_t i = 0; i < n; ++i) {
    const auto& l = structure.layers[i];
    const auto& a = p.attention[i];
    const auto& f = p.ffn[i];
    const std::string name = check_attention_shapes(
        c, l, i, [&](matrix layer::*plain, runtime::detail::panel_matrix attention_panels::*panels, index_t rows, index_t cols, const std::string& what) {
          if ((l.*plain).size()) throw config_error(what + ": the structure of a packed model holds no attention weights");
          require_panels(a.*panels, rows, cols, run, what);
        });
    if (const auto* d = std::get_if<ffn>(&l.ffn)) {
      validate_held(*d, name + ".ffn", c.dim, true);
      if (f.shared.size() != 1 || !f.experts.empty()) throw shape_error(name + ".ffn: a dense layer's panels must be one FFN");
      require_panels(f.shared[0], *d, run, name + ".ffn");
      continue;
    }
    const auto& m = std::get<moe_layer>(l.ffn);
    validate_moe(c, m, name, true, true);
    if (f.experts.size() != m.experts.size() || f.shared.size() != m.shared.size())
      throw shape_error(cat(name, ".moe: panels for ", f.experts.size(), " experts and ", f.shared.size(), " shared ones; the layer has ",
                            m.experts.size(), " and ", m.shared.size()));
    for (std::size_t e = 0; e < m.experts.size(); ++e) {
      const std::string what = cat(name, ".moe.experts[", e, "]");
      if (m.experts[e].is_novice() && f.experts[e].up.rows()) throw shape_error(what + ": a novice has no panels");
      if (!m.experts[e].is_novice()) require_panels(f.experts[e], m.experts[e].weights, run, what, runtime::detail::expert_cuts(m, e));
    }
    for (std::size_t e = 0; e < m.shared.size(); ++e) require_panels(f.shared[e], m.shared[e].weights, run, cat(name, ".moe.shared[", e, "]"));
  }
}

/// Calls f on each FFN of layer `l` whose weights an owning transformer packs
/// and then frees (beside the attention projections): the dense FFN, or the
/// shared experts and the routed ones but novices, unless an oracle router
/// computes the routed experts from their plain weights (those stay).
template <class Layer, class F>
void for_each_packed_ffn(Layer& l, F&& f) {
  if (auto* dense = std::get_if<ffn>(&l.ffn)) return f(*dense);
  auto& m = std::get<moe_layer>(l.ffn);
  if (m.router.kind != router_kind::oracle)
    for (auto& e : m.experts)
      if (!e.is_novice()) f(e.weights);
  for (auto& s : m.shared) f(s.weights);
}

/// Runs a model. Given an lvalue it holds a reference to the weights: they
/// must outlive it, and a caller may replace a layer's FFN between calls
/// (calibration does). Given an rvalue (or its layers one at a time, see
/// layer_source) it owns the weights, which nobody can edit any more, and so
/// runs every FFN, attention projection, the classifier and the embedding
/// prepared (weights packed once into the kernel's panels, in `format`: by
/// default weights::run_dtype()) without any risk of stale
/// panels. In F32 the results are bit-identical to the lvalue form's; in BF16
/// they are those of the weights rounded to BF16 (exactly so when they were
/// stored in BF16), with the tokens of many-token products rounded too unless
/// the format says otherwise (runtime::detail::weight_format). An owning
/// transformer releases each plain matrix once it is packed, so the weights
/// are resident once, in the run dtype: model() then throws, and structure()
/// shows what is left (config, norms, biases, routers, FFN shapes).
class transformer {
 public:
  /// Batches of this many tokens or fewer (decoding, small speculative
  /// batches) attend row by row, reading the cache in place; larger ones
  /// (prefill) as blocked products. A block packs every key and value it
  /// sees, once for all its rows: worth it for many rows, not for a few.
  static constexpr index_t attention_rows_max = 4;
  /// Row-by-row attention wakes the team from this many multiply-adds, 16
  /// times sooner than the kernel's products (runtime::detail::
  /// min_parallel_fma): each multiply-add loads a value of the cache from
  /// memory, where a product reuses its loads from registers.
  static constexpr double attention_parallel_fma = 1 << 16;

  /// Hands an owning transformer layer `li`; called once per layer, in order.
  using layer_source = std::function<layer(index_t li)>;
  /// Takes the plain matrices of a layer once it is packed, to read the next
  /// layer into their storage (io::load_transformer: detail::matrix_pool).
  using matrix_sink = std::function<void(matrix&&)>;

  /// Runs MoE layers outside the transformer (expert parallelism,
  /// distributed/): `run` overwrites out [T, H] with the FFN of MoE layer
  /// `layer` (as structure() holds it) for the tokens `sel` routes. The
  /// transformer routes, reports on_route and keeps the layer's skeleton,
  /// but never packs its FFN. `collective`: every forward pass is a
  /// collective call the processes must make in the same order, one at a
  /// time, so callers must not run passes side by side (see collective()).
  struct external_moe {
    std::vector<bool> layers;  ///< per layer: `run` answers for it
    std::function<void(index_t layer, const moe_layer& m, const runtime::selection& sel, const_matrix_ref ffn_input, matrix_ref out)> run;
    bool collective;  // no initializer: an aggregate the constructors' default arguments can build
  };

  explicit transformer(weights&& w, std::optional<runtime::detail::weight_format> format = std::nullopt)
      : transformer(std::move(w), external_moe{}, format) {}

  /// An owning transformer whose MoE layers in `external.layers` `external.run` runs.
  transformer(weights&& w, external_moe external, std::optional<runtime::detail::weight_format> format = std::nullopt)
      : transformer(without_layers(w), [&w](index_t li) { return std::move(w.layers[std::size_t(li)]); }, format, std::move(external)) {}

  /// An owning transformer built one layer at a time: `globals` holds the
  /// config, embedding, final norm, classifier and weight_dtype (no layers),
  /// and each layer from `next_layer` is validated, packed and released before
  /// the next is asked for, so building holds the packed model plus one
  /// layer's plain matrices (how io::load_transformer loads a BF16 model that
  /// does not fit in memory in F32). With `reuse`, each layer's plain
  /// matrices go to it instead of being freed (the loaders keep them to read
  /// the next layer into). With `unread`, the weight matrices the kernels
  /// read (attention projections, FFN and expert weights) are packed from
  /// where it says, not from their storage: a loader hands them out unread
  /// and points at the file (see runtime::detail::rows_lookup). The result is
  /// the same as transformer(weights&&) on the whole model.
  transformer(weights&& globals, const layer_source& next_layer, std::optional<runtime::detail::weight_format> format = std::nullopt,
              external_moe external = {}, const matrix_sink& reuse = {}, const runtime::detail::rows_lookup& unread = {})
      : owned_(std::make_unique<weights>(std::move(globals))), w_(*owned_), external_(std::move(external)) {
    using moeforge::detail::cat;
    weights& w = *owned_;
    const runtime::detail::weight_format t = format.value_or(runtime::detail::weight_format(w.run_dtype()));
    w.default_run_dtype = t.type;
    if (t.type != dtype::f32 && t.type != dtype::bf16)  // checked here: no exception may leave the parallel loop
      throw config_error(cat("transformer: weights as ", dtype_name(t.type), " are not supported (F32 or BF16)"));
    if (!w.layers.empty()) throw config_error("transformer: the layers come from the layer source; the globals must hold none");
    validate_globals(w);
    if (!external_.layers.empty() && (index_t(external_.layers.size()) != w.config.n_layers || !external_.run))
      throw config_error(cat("transformer: the external MoE runner covers ", external_.layers.size(), " layers, the model has ", w.config.n_layers));
    make_rope_tables();
    const auto pack = [](const matrix& m, runtime::detail::weight_format f) {
      return runtime::detail::panel_matrix(m.data(), m.outerStride(), m.rows(), m.cols(), {}, f);
    };
    // The embedding is read from panels too, in the stored type (exact): the
    // classifier's when tied and they hold the same values.
    const bool shared_embedding = classifier_embeds(w.config, t.type, w.weight_dtype);
    pack_in_parallel({[&] { packed_.classifier = pack(w.classifier(), t); },
                      [&] { if (!shared_embedding) packed_.embedding = pack(w.tok_emb, w.weight_dtype); }});
    w.tok_emb = matrix();
    w.lm_head = matrix();
    const index_t n = w.config.n_layers;
    packed_.ffn.resize(std::size_t(n));
    packed_.attention.resize(std::size_t(n));
    w.layers.reserve(std::size_t(n));
    for (index_t li = 0; li < n; ++li) {
      layer l = next_layer(li);
      validate(w.config, l, std::size_t(li), runs_externally(li));  // the external runner holds the experts it computes
      if (runs_externally(li)) {
        const auto* m = std::get_if<moe_layer>(&l.ffn);
        if (!m || m->router.kind == router_kind::oracle)
          throw config_error(cat("transformer: layer ", li, " is not an MoE layer with a learned router, which the external runner needs"));
      }
      pack_layer(l, li, t, unread);
      release(l, reuse);
      w.layers.push_back(std::move(l));
    }
  }

  /// An owning transformer from what another one runs: `structure` as its
  /// structure() holds it and `panels` as packed() does (a packed model
  /// directory, mapped: io::load_packed). Nothing is packed; the result runs
  /// what the transformer they came from ran, bit for bit.
  transformer(weights&& structure, packed_weights&& panels)
      : owned_(std::make_unique<weights>(std::move(structure))), w_(*owned_), packed_(std::move(panels)) {
    validate(*owned_, packed_);
    owned_->default_run_dtype = packed_.classifier.type();
    for (std::size_t li = 0; li < packed_.ffn.size(); ++li)
      if (const auto* m = std::get_if<moe_layer>(&owned_->layers[li].ffn)) packed_.ffn[li].router = runtime::detail::pack_router(m->router);
    make_rope_tables();
  }

  explicit transformer(const weights& w) : w_(w) {
    validate(w);
    make_rope_tables();
  }

  /// The plain weights (of an lvalue-made transformer; an owning one released
  /// them: config() and structure() say what is left).
  const weights& model() const {
    if (prepared())
      throw config_error("transformer::model(): an owning transformer released its plain weights once packed; use config() or structure()");
    return w_;
  }
  const model::config& config() const { return w_.config; }
  /// The weights as far as they are held: all of them for an lvalue-made
  /// transformer; for an owning one the config, norms, attention biases,
  /// routers, novices and compensation, with every weight matrix empty and each
  /// FFN's shape in ffn::released (layers with an oracle router keep their experts).
  const weights& structure() const { return w_; }
  /// An owning transformer's panels (with structure(), all it runs).
  const packed_weights& packed() const {
    if (!prepared()) throw config_error("transformer::packed(): only an owning transformer packs its weights");
    return packed_;
  }

  /// True when some MoE layer runs outside the transformer (external_moe):
  /// it holds no panels for that layer's experts.
  bool runs_moe_elsewhere() const { return std::find(external_.layers.begin(), external_.layers.end(), true) != external_.layers.end(); }

  /// True when forward passes are collective (external_moe::collective):
  /// run them one at a time, in the same order on every process.
  bool collective() const { return external_.collective; }

  /// An empty cache. It grows with the positions fed to it (doubling, up to
  /// the context), so a model whose context is 128k costs nothing until used.
  kv_cache new_cache() const {
    const auto& c = w_.config;
    kv_cache cache;
    cache.k.assign(std::size_t(c.n_layers), matrix(c.n_kv_heads, 0));
    cache.v = cache.k;
    return cache;
  }

  /// Feeds `tokens` at positions cache.length.. and returns their logits
  /// ([T, V], or [1, V] for the last token when !all_logits; empty when the
  /// run stopped early, which leaves cache.length as it was, as does an error).
  matrix forward(const std::vector<std::int32_t>& tokens, kv_cache& cache, const forward_options& opt = {}) const {
    using moeforge::detail::cat;
    const auto& c = w_.config;
    const index_t n = index_t(tokens.size());
    const index_t start = cache.length;
    check_stop(opt, "forward");
    check_cache(cache, start, n, "forward");
    reserve(cache, start + n);
    stage_clock clock(opt.times);
    matrix x(n, c.dim);
    for (index_t t = 0; t < n; ++t) {
      const auto id = tokens[std::size_t(t)];
      if (id < 0 || id >= c.vocab_size) throw config_error(cat("forward: token ", id, " at ", t, " is outside the vocabulary of ", c.vocab_size));
      if (prepared())
        embedding().row_values(id, 0, c.dim, x.row(t).data());
      else
        x.row(t) = w_.tok_emb.row(id);
    }
    if (n == 0) return matrix(0, c.vocab_size);
    clock.lap(&stage_times::head);
    layer_scratch scratch;
    for (index_t li = 0; li < c.n_layers; ++li) {
      attention_step(li, x, cache, start, scratch);
      clock.lap(&stage_times::attention);
      // Stopped: the later layers stored no keys for these positions, so
      // the cache keeps its length and the next pass writes them again.
      if (!ffn_step(li, x, opt, scratch)) return matrix();
      clock.lap(&stage_times::ffn);
    }
    const index_t first = opt.all_logits ? 0 : n - 1;
    matrix last = x.bottomRows(n - first);
    matrix normed(last.rows(), c.dim);
    rms_norm(last, w_.final_norm, normed);
    matrix logits = prepared() ? runtime::project(normed, packed_.classifier) : runtime::project(normed, w_.classifier());
    // Finite hidden states (the FFNs' inputs are checked) give non-finite
    // logits only from the final norm or the classifier, whose rows for
    // tokens never fed reach nothing else.
    for (index_t r = 0; r < logits.rows(); ++r)
      if (!logits.row(r).allFinite())
        throw value_error(cat("forward: the logits at position ", start + first + r,
                              " are not all finite (a NaN or Inf in the final norm or the classifier's weights)"));
    // Only now: a refused pass leaves the length as it was, like every other
    // error (the keys it wrote are overwritten by the next pass).
    cache.length = start + n;
    clock.lap(&stage_times::head);
    return logits;
  }

  /// The first half of layer `li` on hidden states x [T, H] at positions
  /// start..start+T: x += attention(attn_norm(x)), the keys and values going
  /// into `cache` (whose length the caller advances). With ffn_step this is
  /// one layer of forward(), and of layer_step.
  void attention_step(index_t li, matrix& x, kv_cache& cache, index_t start) const {
    check_step(li, x, "attention_step");
    check_cache(cache, start, x.rows(), "attention_step");
    layer_scratch scratch;
    attention_step(li, x, cache, start, scratch);
  }

  /// The second half of layer `li`: reports the FFN input ffn_norm(x) to
  /// opt.on_ffn_input; returns false right there when li is
  /// opt.stop_after_layer (x unchanged), else adds the FFN's output to x.
  bool ffn_step(index_t li, matrix& x, const forward_options& opt) const {
    check_step(li, x, "ffn_step");
    check_stop(opt, "ffn_step");
    layer_scratch scratch;
    return ffn_step(li, x, opt, scratch);
  }

  /// Layer li alone on hidden states x [T, H] fed from position 0 with a
  /// fresh cache: attention_step, then ffn_step's result. How a model is run
  /// one layer at a time over calibration windows.
  bool layer_step(index_t li, matrix& x, const forward_options& opt) const {
    check_step(li, x, "layer_step");
    check_stop(opt, "layer_step");
    kv_cache cache = new_cache();
    check_cache(cache, 0, x.rows(), "layer_step");
    layer_scratch scratch;
    attention_step(li, x, cache, 0, scratch);
    return ffn_step(li, x, opt, scratch);
  }

 private:
  /// A layer's intermediate matrices, kept from one layer to the next of a
  /// forward pass: allocated per layer, they were fresh memory each time,
  /// and the page faults of writing it (this VM: 3.7 million in a run of
  /// prefills) made a 512-token prefill of 8 llama-7b-shaped layers up to 2x
  /// slower, depending on what the process had allocated and freed before.
  struct layer_scratch {
    matrix xb, y, q, k, v, att;
  };

  void attention_step(index_t li, matrix& x, kv_cache& cache, index_t start, layer_scratch& s) const {
    reserve(cache, start + x.rows());
    const auto& l = w_.layers[std::size_t(li)];
    rms_norm(x, l.attn_norm, moeforge::detail::fit_matrix(s.xb, x.rows(), x.cols()));
    attention(l, li, s, cache, start);
    x += s.y;
  }

  bool ffn_step(index_t li, matrix& x, const forward_options& opt, layer_scratch& s) const {
    const index_t n = x.rows();
    matrix& xb = moeforge::detail::fit_matrix(s.xb, n, x.cols());
    matrix& y = moeforge::detail::fit_matrix(s.y, n, x.cols());
    const auto& l = w_.layers[std::size_t(li)];
    rms_norm(x, l.ffn_norm, xb);
    if (opt.on_ffn_input) opt.on_ffn_input(li, xb);
    if (li == opt.stop_after_layer) return false;
    const runtime::detail::packed_layer* packed = packed_.ffn.empty() ? nullptr : &packed_.ffn[std::size_t(li)];
    if (const auto* f = std::get_if<ffn>(&l.ffn)) {
      if (opt.on_route) opt.on_route(li, runtime::dense_stats(*f, n));
      runtime::detail::dense_forward_packed(*f, packed ? &packed->shared[0] : nullptr, xb, y);
    } else {
      const auto& m = std::get<moe_layer>(l.ffn);
      const runtime::selection sel = runtime::select(m, xb, packed ? &packed->router : nullptr);
      if (opt.on_route) opt.on_route(li, runtime::count_work(m, sel));
      if (runs_externally(li))
        external_.run(li, m, sel, xb, y);
      else
        runtime::detail::moe_forward_packed(m, packed, runtime::make_plan(m, sel, xb), xb, y);
    }
    x += y;
    return true;
  }

  /// Adds the time since the previous lap to one stage; free when not timing.
  class stage_clock {
   public:
    explicit stage_clock(stage_times* times) : times_(times), last_(times ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point()) {}
    void lap(double stage_times::*stage) {
      if (!times_) return;
      const auto now = std::chrono::steady_clock::now();
      times_->*stage += std::chrono::duration<double>(now - last_).count();
      last_ = now;
    }

   private:
    stage_times* times_;
    std::chrono::steady_clock::time_point last_;
  };

  void rms_norm(const matrix& x, const vector& weight, matrix& out) const {
    const float eps = w_.config.norm_eps;
    for (index_t t = 0; t < x.rows(); ++t) {
      // Not Eigen's squaredNorm: the compiler may fuse its packets' products into their sums.
      const float ms = moeforge::detail::dot(x.row(t).data(), x.row(t).data(), x.cols()) / float(x.cols());
      out.row(t) = (x.row(t).array() * weight.transpose().array()) * (1.0f / std::sqrt(ms + eps));
    }
  }

  /// Throws config_error unless layer li exists, and shape_error unless x
  /// holds hidden states of this model's width.
  void check_step(index_t li, const matrix& x, const char* what) const {
    using moeforge::detail::cat;
    const auto& c = w_.config;
    if (li < 0 || li >= c.n_layers) throw config_error(cat(what, ": layer ", li, " does not exist (the model has ", c.n_layers, ")"));
    if (x.cols() != c.dim) throw shape_error(cat(what, ": hidden states have ", x.cols(), " features, the model ", c.dim));
  }

  /// Throws config_error unless opt.stop_after_layer is -1 or a layer of the
  /// model: any other value never matches a layer, so the pass would run to
  /// the end while its caller waits for a layer's input (calib::ffn_inputs
  /// returned uninitialised rows for a layer past the last).
  void check_stop(const forward_options& opt, const char* what) const {
    const index_t stop = opt.stop_after_layer, layers = w_.config.n_layers;
    if (stop < -1 || stop >= layers)
      throw config_error(moeforge::detail::cat(what, ": stop_after_layer is ", stop, ", expected -1 (run every layer) or a layer 0..", layers - 1));
  }

  /// Throws config_error unless positions [start, start + n) fit the model's
  /// context, and shape_error unless `cache` is laid out for this model
  /// (new_cache): writing past a head's capacity would overwrite the next
  /// head's keys. Also throws config_error when `start` lies past
  /// cache.length, and shape_error when that length exceeds what the cache
  /// has room for: the positions in between hold no keys.
  void check_cache(const kv_cache& cache, index_t start, index_t n, const char* what) const {
    using moeforge::detail::cat;
    const auto& c = w_.config;
    if (start < 0 || start + n > c.seq_len)
      throw config_error(cat(what, ": positions ", start, "..", start + n - 1, " exceed the model's context of ", c.seq_len, " (positions 0..", c.seq_len - 1, ")"));
    const auto fits = [&](const std::vector<matrix>& side) {
      return index_t(side.size()) == c.n_layers && std::all_of(side.begin(), side.end(), [&](const matrix& m) {
               return m.rows() == c.n_kv_heads && m.cols() % c.head_dim == 0 && m.cols() == side.front().cols();
             });
    };
    if (!fits(cache.k) || !fits(cache.v) || cache.k.front().cols() != cache.v.front().cols())
      throw shape_error(cat(what, ": the kv cache was made for another model"));
    // Past the stored length the cache is uninitialised capacity (reserve
    // never clears it): a query there would attend to garbage keys and values.
    const index_t capacity = cache.k.front().cols() / c.head_dim;
    if (cache.length < 0 || cache.length > capacity)
      throw shape_error(cat(what, ": the kv cache says it holds ", cache.length, " positions but has room for ", capacity));
    if (start > cache.length)
      throw config_error(cat(what, ": positions ", start, ".. start past the kv cache's ", cache.length,
                             " positions (positions ", cache.length, "..", start - 1, " were never written)"));
  }

  /// Grows the cache to hold `positions` (at least doubling), on huge pages:
  /// a prefill writes all of a fresh cache, and on 4 KiB pages its faults
  /// were most of those left in a 512-token prefill of llama-7b's shape.
  void reserve(kv_cache& cache, index_t positions) const {
    const index_t hd = w_.config.head_dim, have = cache.k.front().cols() / hd;
    if (positions <= have) return;
    const index_t capacity = std::min(w_.config.seq_len, std::max({positions, 2 * have, index_t(64)}));
    for (auto* side : {&cache.k, &cache.v})
      for (auto& m : *side) {
        matrix grown = moeforge::detail::huge_page_matrix(m.rows(), capacity * hd);
        grown.leftCols(have * hd) = m;
        m = std::move(grown);
      }
  }

  /// Positions [start, start + count) of kv head g in one layer's keys or
  /// values (kv_cache's layout), as rows of head_dim values.
  template <class Side>
  auto head_positions(Side& side, index_t g, index_t start, index_t count) const {
    using map = std::conditional_t<std::is_const_v<Side>, Eigen::Map<const matrix>, Eigen::Map<matrix>>;
    const index_t hd = w_.config.head_dim;
    return map(side.row(g).data() + start * hd, count, hd);
  }

  /// Rotates each head of `m` ([T, heads·head_dim]) for positions start + t.
  void rope(matrix& m, index_t heads, index_t start) const {
    const auto& c = w_.config;
    const index_t hd = c.head_dim, half = hd / 2;
    const bool interleaved = c.rope == rope_style::interleaved;
    for (index_t t = 0; t < m.rows(); ++t) {
      float* row = m.row(t).data();
      for (index_t h = 0; h < heads; ++h) {
        float* v = row + h * hd;
        for (index_t j = 0; j < half; ++j) {
          const float co = cos_(start + t, j), si = sin_(start + t, j);
          float& a = interleaved ? v[2 * j] : v[j];
          float& b = interleaved ? v[2 * j + 1] : v[j + half];
          const float a0 = a, b0 = b;
          a = moeforge::detail::mul_add(a0, co, -(b0 * si));
          b = moeforge::detail::mul_add(a0, si, b0 * co);
        }
      }
    }
  }

  /// s.y = attention(s.xb), with s's q, k, v, att as its intermediates.
  void attention(const layer& l, index_t li, layer_scratch& s, kv_cache& cache, index_t start) const {
    const auto& c = w_.config;
    const index_t n = s.xb.rows(), hd = c.head_dim;
    const attention_panels* panels = prepared() ? &packed_.attention[std::size_t(li)] : nullptr;
    const auto product = [&](const runtime::detail::panel_matrix attention_panels::*which, const matrix& w, matrix& out) {
      return panels ? runtime::projection(panels->*which, out) : runtime::projection(w, out);
    };
    matrix &q = s.q, &k = s.k, &v = s.v;
    runtime::project(s.xb, {product(&attention_panels::wq, l.wq, q), product(&attention_panels::wk, l.wk, k), product(&attention_panels::wv, l.wv, v)});
    if (l.bq.size()) q.rowwise() += l.bq.transpose();
    if (l.bk.size()) k.rowwise() += l.bk.transpose();
    if (l.bv.size()) v.rowwise() += l.bv.transpose();
    rope(q, c.n_heads, start);
    rope(k, c.n_kv_heads, start);
    matrix& kc = cache.k[std::size_t(li)];
    matrix& vc = cache.v[std::size_t(li)];
    for (index_t g = 0; g < c.n_kv_heads; ++g) {
      head_positions(kc, g, start, n) = k.middleCols(g * hd, hd);
      head_positions(vc, g, start, n) = v.middleCols(g * hd, hd);
    }
    const float scale = 1.0f / std::sqrt(float(hd));
    matrix& att = moeforge::detail::fit_matrix(s.att, n, c.n_heads * hd);
    if (n <= attention_rows_max)
      attend_rows(q, kc, vc, start, scale, att);
    else
      attend_blocks(q, kc, vc, start, scale, att);
    runtime::project(att, {product(&attention_panels::wo, l.wo, s.y)});
  }

  /// softmax(q·Kᵀ·scale)·V for a few query rows at positions start.., each
  /// row's query heads that share a kv head (grouped-query attention) reading
  /// its visible keys and values straight from the cache, once per task (for
  /// the whole group unless heads_per_task splits it). (The block path would
  /// transpose the values and pack both for a product with one row, several
  /// passes over the cache: llama-7b-shaped decode ran at half its context-0
  /// speed at a 512-token context.) Each head's scores, softmax and sums are
  /// its own, in key order, so how many heads a task takes changes no result.
  /// A non-finite value at a visible key reaches the row as it must; later
  /// keys are never read.
  void attend_rows(const matrix& q, const matrix& kc, const matrix& vc, index_t start, float scale, matrix& att) const {
    const auto& c = w_.config;
    const index_t n = q.rows(), hd = c.head_dim, group = c.n_heads / c.n_kv_heads;
    const double multiply_adds = 2.0 * double(n) * double(c.n_heads) * double(start + n) * double(hd);
    const bool parallel = multiply_adds >= attention_parallel_fma;
    const index_t per_task = heads_per_task(group, c.n_kv_heads * n, parallel);
    const index_t splits = group / per_task;
    runtime::detail::run_on_team(parallel, [&] {
      // Eigen's reductions and vectorised exp start at the first aligned
      // element, so aligned buffers (Eigen arrays, not std::vector<float>)
      // keep which values go through which path, and the sums' order, a
      // function of the shapes.
      std::vector<Eigen::ArrayXf> scores(static_cast<std::size_t>(per_task));
      for (auto& p : scores) p.resize(start + n);
      const auto attend = [&](index_t task) {
        const index_t r = task % n, g = task / n / splits, h0 = g * group + task / n % splits * per_task;
        const index_t visible = start + r + 1;
        const float *keys = kc.row(g).data(), *queries = q.row(r).data() + h0 * hd;
        for (index_t j = 0; j < visible; ++j) {
          fetch_cache_ahead(keys + j * hd, hd);
          for (index_t i = 0; i < per_task; ++i) scores[std::size_t(i)](j) = moeforge::detail::dot(queries + i * hd, keys + j * hd, hd) * scale;
        }
        for (auto& p : scores) softmax(p.head(visible));
        // A group's query heads are adjacent in q and att: its outputs are one run.
        float* __restrict out = att.row(r).data() + h0 * hd;
        std::fill_n(out, per_task * hd, 0.0f);
        for (index_t j = 0; j < visible; ++j) {
          const float* __restrict value = vc.row(g).data() + j * hd;
          fetch_cache_ahead(value, hd);
          for (index_t i = 0; i < per_task; ++i) {
            const float pj = scores[std::size_t(i)](j);
            float* __restrict o = out + i * hd;
            for (index_t d = 0; d < hd; ++d) o[d] = moeforge::detail::mul_add(pj, value[d], o[d]);
          }
        }
      };
      runtime::detail::for_each_task(c.n_kv_heads * splits * n, attend, runtime::detail::sharing::in_blocks);
    });
  }

  /// How many of a kv head's `group` query heads one task of attend_rows
  /// takes, with `tasks` (kv head, row) pairs to share: all of them, so the
  /// keys and values are read once, unless that leaves threads of the team
  /// without a task; then halved while it does and the count stays even.
  static index_t heads_per_task(index_t group, index_t tasks, bool parallel) {
    index_t per = group;
#if defined(_OPENMP)
    // Inside an active region that allows no more nesting the team is this
    // thread; inside an inactive one (if(false)) the nested region is the first active one.
    const index_t threads = parallel && omp_get_active_level() < omp_get_max_active_levels() ? index_t(omp_get_max_threads()) : 1;
    while (per % 2 == 0 && tasks * (group / per) < threads) per /= 2;
#else
    (void)tasks, (void)parallel;
#endif
    return per;
  }

  /// Fetches into L1 the `count` values cache_bytes_ahead past `row` (a
  /// key's or value's) in the same head's stream. The hardware prefetcher
  /// alone left the loops at a 1024-token context 20-25% slower (llama-7b
  /// shape, 4 and 16 keys ahead alike).
  static void fetch_cache_ahead([[maybe_unused]] const float* row, [[maybe_unused]] index_t count) {
#if defined(__GNUC__)
    constexpr std::uintptr_t cache_bytes_ahead = 2048, line = 64;
    // As an address, not a pointer: past a head's last position it lies beyond the storage (a prefetch never faults).
    const std::uintptr_t from = reinterpret_cast<std::uintptr_t>(row) + cache_bytes_ahead;
    for (std::uintptr_t b = 0; b < std::uintptr_t(count) * sizeof(float); b += line) __builtin_prefetch(reinterpret_cast<const void*>(from + b), 0, 3);
#endif
  }

  /// p = exp(p − max p) / Σ, in place (p an Eigen array expression).
  template <class Scores>
  static void softmax(Scores&& p) {
    p = (p - p.maxCoeff()).exp();
    p /= p.sum();
  }

  /// The same for many query rows (prefill), as blocked products.
  void attend_blocks(const matrix& q, const matrix& kc, const matrix& vc, index_t start, float scale, matrix& att) const {
    const auto& c = w_.config;
    const index_t n = q.rows(), hd = c.head_dim, group = c.n_heads / c.n_kv_heads;
    // Each kv head's values transposed ([head_dim, keys]), so both attention
    // products are the kernel's x·Wᵀ (see runtime/project.hpp on why not Eigen's GEMM).
    const index_t all_keys = start + n;
    std::vector<matrix> vt(static_cast<std::size_t>(c.n_kv_heads));
    // A block's product also multiplies the masked (zero) probabilities by
    // later tokens' values: exact zeros for finite values, NaN for NaN or Inf
    // ones, which would reach earlier positions. So the products see such
    // values as zero, and each row then adds the terms of the non-finite
    // values it may see (a sum with a NaN or infinite term is NaN or that
    // infinity in any order); finite inputs keep their arithmetic bit for bit.
    struct entry {
      index_t key, column;
    };
    std::vector<std::vector<entry>> non_finite(vt.size());  // per kv head
    for (index_t g = 0; g < c.n_kv_heads; ++g) {
      matrix& values = vt[std::size_t(g)] = head_positions(vc, g, 0, all_keys).transpose();
      if (values.allFinite()) continue;
      for (index_t key = 0; key < all_keys; ++key)
        for (index_t d = 0; d < hd; ++d)
          if (!std::isfinite(values(d, key))) {
            non_finite[std::size_t(g)].push_back({key, d});
            values(d, key) = 0;
          }
    }
    // Queries in blocks of 32 against only the keys the block's last token may
    // see: causal prefill costs about half a full score matrix, as GEMMs.
    constexpr index_t block = 32;
    const index_t blocks = (n + block - 1) / block;
#pragma omp parallel for collapse(2) schedule(static)
    for (index_t h = 0; h < c.n_heads; ++h) {
      for (index_t b = 0; b < blocks; ++b) {
        const index_t t0 = b * block, rows = std::min(block, n - t0);
        const index_t g = h / group, keys = start + t0 + rows;
        matrix sc = runtime::detail::times_transpose({{kc.row(g).data(), hd, keys}}, q.block(t0, h * hd, rows, hd)) * scale;
        for (index_t r = 0; r < rows; ++r) {
          const index_t visible = start + t0 + r + 1;
          softmax(sc.row(r).head(visible).array());
          sc.row(r).tail(keys - visible).setZero();
        }
        const matrix& v = vt[std::size_t(g)];
        att.block(t0, h * hd, rows, hd) = runtime::detail::times_transpose({{v.data(), v.cols(), hd}}, sc);
        for (const entry& e : non_finite[std::size_t(g)])
          for (index_t r = std::max<index_t>(0, e.key - start - t0); r < rows; ++r) {
            float& out = att(t0 + r, h * hd + e.column);
            out = moeforge::detail::mul_add(sc(r, e.key), vc(g, e.key * hd + e.column), out);
          }
      }
    }
  }

  /// w's config, globals and weight type, without its layers (which must be as many as the config says).
  static weights without_layers(weights& w) {
    if (index_t(w.layers.size()) != w.config.n_layers)
      throw shape_error(moeforge::detail::cat("model: ", w.layers.size(), " layers, config says ", w.config.n_layers));
    return take_globals(w);
  }

  void make_rope_tables() {
    const auto& c = w_.config;
    const index_t half = c.head_dim / 2;
    cos_.resize(c.seq_len, half);
    sin_.resize(c.seq_len, half);
    for (index_t p = 0; p < c.seq_len; ++p)
      for (index_t j = 0; j < half; ++j) {
        const double angle = double(p) * std::pow(double(c.rope_theta), -2.0 * double(j) / double(c.head_dim));
        cos_(p, j) = float(std::cos(angle));
        sin_(p, j) = float(std::sin(angle));
      }
  }

  /// Runs the packing tasks side by side (packing only moves and rounds
  /// values, so the panels are the same whoever packs them: loading is
  /// memory-bound); the first task's exception (bad_alloc on a big model, a
  /// NaN in a file's weights) is rethrown once the loop is over.
  static void pack_in_parallel(const std::vector<std::function<void()>>& tasks) {
    std::vector<std::exception_ptr> failed(tasks.size());
#pragma omp parallel for schedule(dynamic, 1)
    for (std::ptrdiff_t i = 0; i < std::ptrdiff_t(tasks.size()); ++i) {
      try {
        tasks[std::size_t(i)]();
      } catch (...) {
        failed[std::size_t(i)] = std::current_exception();
      }
    }
    // The first task's error, whichever thread failed first: the same message for any thread count.
    for (const auto& e : failed)
      if (e) std::rethrow_exception(e);
  }

  /// Packs layer li's attention projections and FFN into its panels: one
  /// task per matrix, per routed expert.
  void pack_layer(const layer& l, index_t li, runtime::detail::weight_format t, const runtime::detail::rows_lookup& unread) {
    using runtime::detail::panel_matrix;
    std::vector<std::function<void()>> tasks;
    const auto matrix_task = [&](panel_matrix& out, const matrix& m) {
      tasks.push_back([&out, &m, t, &unread] { out = panel_matrix(runtime::detail::source_of(m, unread), m.rows(), m.cols(), {}, t); });
    };
    // An FFN without cuts, matrix by matrix: runtime::detail::pack_ffn(f, {}, t, unread).
    const auto ffn_tasks = [&](runtime::detail::packed_ffn& out, const ffn& f) {
      out.act = f.act;
      if (f.gated()) matrix_task(out.gate, f.gate);
      matrix_task(out.up, f.up);
      matrix_task(out.down, f.down);
    };
    auto& a = packed_.attention[std::size_t(li)];
    matrix_task(a.wq, l.wq);
    matrix_task(a.wk, l.wk);
    matrix_task(a.wv, l.wv);
    matrix_task(a.wo, l.wo);
    auto& p = packed_.ffn[std::size_t(li)];
    if (const auto* f = std::get_if<ffn>(&l.ffn)) {
      p.shared.resize(1);
      ffn_tasks(p.shared[0], *f);
    } else {
      const auto& m = std::get<moe_layer>(l.ffn);
      tasks.push_back([&p, &m] { p.router = runtime::detail::pack_router(m.router); });
      if (!runs_externally(li)) {  // an external runner holds the layer's experts
        p.experts.resize(m.experts.size());
        p.shared.resize(m.shared.size());
        for (std::size_t e = 0; e < m.experts.size(); ++e)
          tasks.push_back([&p, &m, e, t, &unread] { p.experts[e] = runtime::detail::pack_expert(m, e, t, unread); });
        for (std::size_t s = 0; s < m.shared.size(); ++s) ffn_tasks(p.shared[s], m.shared[s].weights);
      }
    }
    pack_in_parallel(tasks);
  }

  /// Frees a packed layer's plain matrices (for_each_packed_ffn's FFNs and
  /// the attention projections), or hands them to `reuse`.
  static void release(layer& l, const matrix_sink& reuse) {
    const auto give = [&reuse](matrix&& m) {
      if (reuse) reuse(std::move(m));
    };
    for (matrix* m : {&l.wq, &l.wk, &l.wv, &l.wo}) hand_back(*m, give);
    for_each_packed_ffn(l, [&](ffn& f) { moeforge::release(f, give); });
  }

  const runtime::detail::panel_matrix& embedding() const { return packed_.embedding.rows() ? packed_.embedding : packed_.classifier; }

  std::unique_ptr<weights> owned_;  ///< the weights when the transformer owns them (matrices released once packed)
  const weights& w_;
  bool prepared() const { return owned_ != nullptr; }
  bool runs_externally(index_t li) const { return !external_.layers.empty() && external_.layers[std::size_t(li)]; }

  packed_weights packed_;  ///< when owned
  matrix cos_, sin_;  ///< [seq_len, head_dim/2] RoPE tables
  external_moe external_{};
};

}  // namespace moeforge::model
