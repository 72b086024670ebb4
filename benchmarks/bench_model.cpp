// moeforge-bench model: whole-model speed — single-stream prefill and warmed
// decode tokens/s, where each token's time goes (attention, FFN/MoE, head),
// the bytes a decoded token must read and the share of the machine's measured
// bandwidth that reaches — for a model moeforge loads or a synthetic one of a
// published shape, dense beside CMoE layouts.
#include <cstdio>
#include <iomanip>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "json_out.hpp"
#include "machine.hpp"
#include "process.hpp"
#include "moeforge/io/load.hpp"
#include "moeforge/model/eval.hpp"
#include "synthetic.hpp"

namespace moeforge::cli {

namespace {

/// Weight and KV-cache bytes one decoded token reads at `context` earlier
/// positions, with the kernels' weights `weight_bytes` wide (the router,
/// norms, embedding row and KV cache stay F32): every attention matrix, the
/// FFN part it computes (for an MoE: router, shared experts and top-k
/// average-width experts), one embedding row, the classifier, and the keys and
/// values of the context. From the shapes alone (an owning transformer's
/// structure() holds no weight matrices).
double decode_bytes(const model::weights& w, index_t context, double weight_bytes) {
  const auto& c = w.config;
  const auto size = [](const matrix& m) { return double(m.size()); };
  const auto ffn_size = [](const ffn& f) { return double(parameter_count(f)); };
  const double q = double(c.n_heads * c.head_dim), kv = double(c.n_kv_heads * c.head_dim), dim = double(c.dim);
  double weights = double(c.vocab_size) * dim, f32 = dim;
  for (const auto& l : w.layers) {
    weights += 2.0 * q * dim + 2.0 * kv * dim;
    f32 += 2.0 * double(context) * kv;
    if (const auto* f = std::get_if<ffn>(&l.ffn)) {
      weights += ffn_size(*f);
      continue;
    }
    const auto& m = std::get<moe_layer>(l.ffn);
    f32 += size(m.router.weight) + size(m.router.weight_up);
    for (const auto& s : m.shared) weights += ffn_size(s.weights);
    double routed = 0;
    for (const auto& e : m.experts) routed += ffn_size(e.weights);
    weights += routed * double(m.router.top_k) / double(m.experts.size());
  }
  return weights * weight_bytes + 4.0 * f32;
}

struct variant {
  std::string name, moe;  ///< moe: "" for the model as given
};

/// Decode tokens/s at context 0 (with its stage times) and the DRAM read
/// bandwidth, each the best of `rounds` measured in turn. On a shared machine
/// the bandwidth on offer drifts by a third or more within a minute (seen
/// here between 30 and 57 GB/s), so one probe before all the rows would judge
/// a row against another machine than the one that ran it. With a
/// `reference` (the dense model), each round decodes it too, first in every
/// other round, so that the ratio of the two bests compares the same phases
/// of the machine rather than rows measured minutes apart.
struct decode_measure {
  double tok_s = 0, gbs = 0, reference_tok_s = 0;  ///< reference_tok_s: 0 without a reference
  model::stage_times times;
};
decode_measure measure_decode(const model::transformer& tr, const model::transformer* reference, index_t steps, int threads,
                              long long rounds) {
  decode_measure best;
  const auto own = [&] {
    model::stage_times times;
    const double tok_s = model::decode_tokens_per_second(tr, steps, 0, &times);
    if (tok_s > best.tok_s) best.tok_s = tok_s, best.times = times;
  };
  const auto other = [&] {
    if (reference) best.reference_tok_s = std::max(best.reference_tok_s, model::decode_tokens_per_second(*reference, steps));
  };
  for (long long r = 0; r < rounds; ++r) {
    best.gbs = std::max(best.gbs, bench::probe_read_gbps(threads));
    if (r % 2) own(), other();
    else other(), own();
  }
  return best;
}

/// Whether the dense model (`rss_mb` resident, weights `size` bytes wide)
/// can stay resident while a CMoE layout of it is built beside it: that needs
/// its plain F32 weights and their packed copy, each about the dense model's
/// size, with a quarter to spare. llama-7b's 8 layers qualify in BF16 on 24 GB,
/// not in F32.
bool room_to_keep(double rss_mb, std::size_t size) { return bench::available_mb() > 1.25 * rss_mb * (1.0 + 4.0 / double(size)); }

/// This process's resident memory but the bandwidth probe's buffer, in MB.
double resident_mb() { return bench::status_mb("VmRSS:") - bench::probe_resident_mb(); }

}  // namespace

int bench_model(int argc, char** argv) {
  args a("moeforge-bench model",
         "Whole-model speed, one stream, on this machine: prefill tokens/s of 64 and --context (512) tokens fed to an empty\n"
         "cache in one forward pass (best of 3 after a warm-up), decode tokens/s of one-token steps after a prefill of 0\n"
         "and of --context tokens (two warm-up steps, then --decode-steps timed), the share of a decoded token's time in attention,\n"
         "FFN/MoE and the embedding/classifier, resident memory, and the bytes each decoded token reads (weights it\n"
         "uses + KV cache) against the DRAM read bandwidth measured beside it (--rounds). --shape builds seeded random weights\n"
         "in memory (no files; only speed is meaningful): llama-7b, mistral-7b, mixtral-mini (hidden 2048, 8 experts of\n"
         "5632, top 2, 32 heads, 8 KV heads, vocab 32000), tiny. For a dense shape --moe adds CMoE layouts of it\n"
         "(random partition: s shared + top-a of e-s routed experts of I/e neurons) beside the dense row. \"load s\" is the\n"
         "time to load the model (for --shape: to generate its weights) and pack it for the kernels; the resident memory\n"
         "holds the packed weights only (the plain ones are released once packed). \"x dense\" is a CMoE row's decode over\n"
         "the dense model's, the two decoded in the same rounds (where memory allows keeping the dense model).");
  a.option("model", "PATH", "a model moeforge loads (native, llama2.c .bin, Hugging Face directory) instead of --shape")
      .option("shape", "NAME", "synthetic model shape", "llama-7b")
      .option("layers", "L", "layers of the synthetic model", "8")
      .option("moe", "LIST", "CMoE layouts of a dense shape to compare with it, comma-separated ('' for none)", "S1A1E4,S1A1E8")
      .option("dtype", "LIST", "weight types the kernels read, comma-separated (f32, bf16; each a row of its own)", "f32,bf16")
      .option("decode-steps", "N", "timed decode steps per row", "16")
      .option("rounds", "N", "rounds of (bandwidth probe, decode at context 0) per row, the best of each kept (decode at the "
              "longer context runs once)", "3")
      .option("context", "N",
              "the longer decode context and prefill length, 64 to 131072 (JSON prefill512_tok_s and decode_ctx512_tok_s hold its "
              "figures whatever its value, named after its default; prefill_long_tokens and decode_long_context say which)",
              "512")
      .option("seed", "N", "seed of the synthetic weights", "1")
      .option("json", "FILE", "also write the rows as a JSON array to FILE");
  if (!a.parse(argc, argv)) return 0;
  const bench::json_output json = bench::json_option(a);
  const std::vector<dtype> types = a.get_list("dtype", parse_weight_dtype, "f32, bf16");
  // Llama 3.1's 128K, the longest context a model takes now; far beyond it a
  // prefill's activations outgrow memory and the run ends in bad_alloc.
  constexpr long long max_context = 1 << 17;
  const index_t steps = a.get_int("decode-steps", 1), context = a.get_int("context", 64, max_context), layers = a.get_int("layers", 1);
  const long long rounds = a.get_int("rounds", 1);
  const std::uint64_t seed = std::uint64_t(a.get_int("seed", 0));

  std::vector<variant> variants{{"as given", ""}};
  const bool synthetic = !a.has("model");
  std::optional<bench::model_shape> shape;
  if (synthetic) {
    shape = a.get_parsed("shape", bench::find_shape);
    variants.front().name = shape->experts ? "moe" : "dense";
    // The default layouts are for dense shapes; on an MoE shape they are
    // skipped, and layouts given are refused (it has no dense FFN to lay out).
    if (!a.get("moe").empty() && (!shape->experts || a.given("moe")))
      for (const auto& m : a.get_list(
               "moe",
               [&](const std::string& m) {
                 bench::moe_layout(*shape, m);
                 return m;
               },
               "S{s}A{a}E{e}"))
        variants.push_back({m, m});
  }
  const int threads = omp_get_max_threads();
  const std::string label = synthetic ? shape->name : a.get("model");
  std::printf("%s, %s layers, %d threads; each row's decode and DRAM read bandwidth (GB/s) the best of %lld rounds measured in turn\n",
              label.c_str(), synthetic ? a.get("layers").c_str() : "all", threads, rounds);
  const std::string prefill_long = detail::cat("pf", context, " t/s"), decode_long = detail::cat("dec", context);
  std::printf("%-10s %-5s %6s %7s %8s %9s %10s %10s %8s %9s %9s %6s %8s %7s %6s %6s\n", "layout", "dtype", "active", "load s", "RSS MB",
              "pf64 t/s", prefill_long.c_str(), "dec0 t/s", "x dense", decode_long.c_str(), "MB/token", "GB/s", "of BW", "attn", "ffn", "head");
  nlohmann::json rows = nlohmann::json::array();
  for (const dtype type : types) {
    // The dense row's model, kept (memory allowing) to decode beside each CMoE layout of the same type.
    std::optional<model::transformer> dense;
    // What the dense model adds to the resident memory, left out of the later rows' figures.
    double dense_mb = 0;
    const double before_mb = resident_mb();
    for (const auto& v : variants) {
      // Made afresh per row, so the resident memory is this row's alone.
      const auto t0 = std::chrono::steady_clock::now();
      // Owning: every weight on prepared layouts of this type (a model file read layer by layer).
      model::transformer tr =
          synthetic ? model::transformer(bench::synthetic_model(*shape, layers, v.moe, seed, 2 * context + 64), type)
                    : io::load_transformer(a.get("model"), {}, type);
      const double load_s = bench::seconds_since(t0);
      // A model built after another leaves glibc's heap fragmented around its
      // panels (about 1 GB per 2 layers of llama-7b measured), which would
      // count in this row's resident memory though nothing uses it.
#if defined(__GLIBC__)
      malloc_trim(0);
#endif
      const double active = model::active_ffn_fraction(tr.structure());
      const auto& c = tr.config();
      if (c.seq_len < context + 3) throw config_error(detail::cat("model: its context of ", c.seq_len, " is shorter than --context ", context, " + 3"));
      const double pf64 = model::prefill_tokens_per_second(tr, 64);
      const double pf_long = model::prefill_tokens_per_second(tr, context);
      const auto decode = measure_decode(tr, dense ? &*dense : nullptr, steps, threads, rounds);
      const double dec0 = decode.tok_s, row_gbs = decode.gbs;
      const auto& times = decode.times;
      const double dec_long = model::decode_tokens_per_second(tr, steps, context);
      const double bytes = decode_bytes(tr.structure(), 1, double(dtype_size(type))), fraction = bytes * dec0 / 1e9 / row_gbs;
      const double rss = resident_mb() - dense_mb;
      const double vs_dense = dense ? dec0 / decode.reference_tok_s : 0;
      const std::string type_name(dtype_name(type));
      std::printf("%-10s %-5s %6.2f %7.2f %8.0f %9.1f %10.1f %10.2f %8s %9.2f %9.1f %6.1f %7.0f%% %6.0f%% %5.0f%% %5.0f%%\n", v.name.c_str(),
                  type_name.c_str(), active, load_s, rss, pf64, pf_long, dec0, dense ? detail::cat(std::fixed, std::setprecision(2), vs_dense).c_str() : "-",
                  dec_long, bytes / 1e6, row_gbs, 100 * fraction, 100 * times.attention / times.total(), 100 * times.ffn / times.total(),
                  100 * times.head / times.total());
      std::fflush(stdout);
      nlohmann::json row{{"shape", label},
                         {"layers", c.n_layers},
                         {"dtype", type_name},
                         {"moe", v.moe.empty() ? (synthetic && shape->experts ? "native" : "none") : v.moe},
                         {"active_fraction", active},
                         {"threads", threads},
                         {"load_s", load_s},
                         {"rss_mb", rss},
                         {"prefill64_tok_s", pf64},
                         {"prefill512_tok_s", pf_long},
                         {"prefill_long_tokens", context},
                         {"decode_tok_s", dec0},
                         {"decode_ctx512_tok_s", dec_long},
                         {"decode_long_context", context},
                         {"bytes_per_token", bytes},
                         {"machine_gbs", row_gbs},
                         {"rounds", rounds},
                         {"decode_bandwidth_fraction", fraction},
                         {"decode_share_attention", times.attention / times.total()},
                         {"decode_share_ffn", times.ffn / times.total()},
                         {"decode_share_head", times.head / times.total()}};
      if (dense) row["decode_vs_dense"] = vs_dense, row["dense_decode_tok_s"] = decode.reference_tok_s;
      rows.push_back(std::move(row));
      if (v.moe.empty() && variants.size() > 1 && room_to_keep(rss, dtype_size(type))) dense.emplace(std::move(tr)), dense_mb = rss - before_mb;
    }
  }
  json.write(rows);
  return 0;
}

}  // namespace moeforge::cli
