// moeforge-bench ffn: the MoE and dense FFN kernels, prepared and from plain
// weights, against Eigen and against this machine's measured DRAM bandwidth
// and FP32 FMA peak, on cold weights.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "json_out.hpp"
#include "machine.hpp"
#include "options.hpp"
#include "moeforge/runtime/dense_ffn.hpp"
#include "moeforge/runtime/moe_ffn.hpp"
#include "moeforge/runtime/prepared.hpp"

namespace moeforge::cli {

namespace {

constexpr index_t hidden = 2048, intermediate = 5632;
// Layer copies rotated so each timed call reads its weights from DRAM: a
// call that reads under 3x the 32 MiB L3 rotates as many copies as it takes
// to read that much of the others' weights before one is read again, up to
// two of the dense layer and, of a MoE layer, four or as many as fit in
// moe_copy_bytes (a decode step touches a quarter of an E8A2 copy; at most 52
// MB in between there; a custom layer of 8 experts of 64 neurons rotated in
// four copies stayed in L3 and read at 2.7x the DRAM bandwidth). A call that
// reads more needs one, and gets one: rotating copies of a layer that size
// adds nothing against the caches, but on this VM memory not read for a
// while reads slower (Qwen3-30B-A3B's BF16 layer at 64 tokens, 1.2 GB a
// call: 34 ms rotating four copies, 22-24 ms reusing one), which the
// bandwidth probe, reading one buffer over and over, does not pay either.
// Building no more copies than the rotation needs also keeps
// Qwen3-30B-A3B's layer at both types in memory at once: one F32 copy and
// three BF16 ones, each with its plain F32 weights, 16 GB.
constexpr int ncopies = 2, moe_copies = 4;
constexpr double cold_bytes = 96e6, moe_copy_bytes = 4e9;
/// How many copies a call touching `weights` weights of `type` needs to read its weights from DRAM.
int copies_needed(dtype type, double weights) {
  const double bytes = double(dtype_size(type)) * weights;
  return bytes >= cold_bytes ? 1 : 1 + int(std::ceil(cold_bytes / bytes));
}
/// How many of `built` copies a call touching `weights` weights of `type` rotates.
int copies_for(dtype type, double weights, int built) { return std::min(built, copies_needed(type, weights)); }
/// How many copies of a MoE layer of `layer_weights` weights may be built: four, more where they fit in
/// moe_copy_bytes (counting each copy's plain F32 weights and its panels of either type).
int moe_copies_within(double layer_weights) { return std::max(moe_copies, int(moe_copy_bytes / (layer_weights * (4.0 + 4.0 + 2.0)))); }

matrix random_matrix(index_t r, index_t c, float scale, std::mt19937& rng) {
  std::normal_distribution<float> n(0.0f, scale);
  matrix m(r, c);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = n(rng);
  return m;
}

ffn random_ffn(index_t neurons, std::mt19937& rng) {
  return {random_matrix(neurons, hidden, 0.02f, rng), random_matrix(neurons, hidden, 0.02f, rng),
          random_matrix(hidden, neurons, 0.02f, rng), activation::silu};
}

double ffn_weights(const ffn& f) { return double(f.gate.size() + f.up.size() + f.down.size()); }

/// A MoE layer shape: `routed` experts of `width` neurons, top-`k`, plus
/// `shared` always-on experts of `shared_width`. The split shapes (E8A2, …)
/// divide the dense I = 5632 and are compared with the dense layer too.
struct moe_shape {
  std::string name;
  index_t routed, width, k, shared = 0, shared_width = 0;
  bool split = false;  ///< an equal split of the dense FFN: dense ratio and ideal are reported
};

moe_shape split_shape(const char* name, index_t shared, index_t routed, index_t k) {
  const index_t w = intermediate / (shared + routed);
  return {name, routed, w, k, shared, shared > 0 ? w : 0, true};
}

/// The layers run by default: the dense I = 5632 split into 8 experts, top 2
/// (E8A2), or shared and routed ones (S1A1E8: 1 shared, 1 of 7 routed).
std::vector<moe_shape> split_shapes() {
  return {split_shape("E8A2", 0, 8, 2), split_shape("S1A1E8", 1, 7, 1), split_shape("S3A3E8", 3, 5, 3)};
}

/// A split shape by name, `qwen3-30b-a3b`, `dsv2-lite`, or the form
/// HxExI/k[+S] (H must be 2048; S a shared expert's width), e.g. 2048x64x1408/6+2816.
moe_shape parse_shape(const std::string& text) {
  for (auto& split : split_shapes())
    if (text == split.name) return split;
  if (text == "qwen3-30b-a3b") return {text, 128, 768, 8};
  if (text == "dsv2-lite") return {text, 64, 1408, 6, 1, 2816};
  long long h = 0, e = 0, i = 0, k = 0, s = 0;
  // `used` ends where the last field read ended: text after the form (or
  // signs and spaces sscanf would skip inside it) is refused, not ignored.
  int used = -1;
  std::sscanf(text.c_str(), "%lldx%lldx%lld/%lld%n+%lld%n", &h, &e, &i, &k, &used, &s, &used);
  if (used != int(text.size()) || text.find_first_not_of("0123456789x/+") != std::string::npos || h != hidden || e < 1 || i < 1 || k < 1 ||
      k > e)
    throw config_error("'" + text + "': expected E8A2, S1A1E8, S3A3E8, qwen3-30b-a3b, dsv2-lite or HxExI/k[+S] with H = " +
                       std::to_string(hidden) + ", 1 <= k <= E");
  // A layer that cannot fit in memory would end the run in bad_alloc once built.
  const double bytes = 3.0 * double(hidden) * (double(e) * double(i) + double(s)) * sizeof(float), memory = bench::physical_memory_bytes();
  if (memory > 0 && bytes > memory)
    throw config_error(moeforge::detail::cat("'", text, "': its F32 weights take ", bytes / 1e9, " GB, more than this machine's ", memory / 1e9,
                                             " GB of memory"));
  return {text, e, i, k, s > 0 ? 1 : 0, s};
}

moe_layer random_moe(const moe_shape& s, std::mt19937& rng) {
  moe_layer m;
  m.router.weight = random_matrix(s.routed, hidden, 0.02f, rng);
  m.router.top_k = s.k;
  for (index_t e = 0; e < s.routed; ++e) m.experts.push_back({random_ffn(s.width, rng), vector(), 0, {}});
  for (index_t e = 0; e < s.shared; ++e) m.shared.push_back({random_ffn(s.shared_width, rng), vector()});
  return m;
}

/// Uniformly random distinct top-k per token with equal weights: balanced load, seeded.
runtime::routing_plan balanced_plan(const moe_layer& m, const matrix& x, std::mt19937& rng) {
  runtime::selection sel;
  sel.tokens = x.rows();
  sel.k = m.router.top_k;
  std::vector<std::int32_t> order(std::size_t(m.num_experts()));
  for (index_t t = 0; t < x.rows(); ++t) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (index_t j = 0; j < sel.k; ++j) {
      sel.expert.push_back(order[std::size_t(j)]);
      sel.prob.push_back(1.0f / float(sel.k));
      sel.weight.push_back(1.0f / float(sel.k));
      sel.work.push_back(runtime::pair_work::full);
    }
  }
  return runtime::make_plan(m, sel, x);
}

/// Weights the plan touches and the FLOPs it does.
std::pair<double, double> active_cost(const moe_layer& m, const runtime::routing_plan& plan) {
  double weights = 0, flops = 0;
  for (const auto& s : m.shared) {
    weights += ffn_weights(s.weights);
    flops += 2.0 * ffn_weights(s.weights) * double(plan.tokens);
  }
  for (index_t e = 0; e < m.num_experts(); ++e) {
    const index_t n = plan.offsets[std::size_t(e + 1)] - plan.offsets[std::size_t(e)];
    if (n == 0) continue;
    const auto& f = m.experts[std::size_t(e)].weights;
    weights += ffn_weights(f);
    flops += 2.0 * ffn_weights(f) * double(n);
  }
  return {weights, flops};
}

/// The machine's limits beside one row: DRAM read bandwidth and the row's
/// arithmetic peak (FP32 FMA, or BF16 dot products), each the better of the
/// probes taken just before and just after the row's timings. On a shared
/// machine both drift (this VM's bandwidth between 30 and 57 GB/s within one
/// run, its FMA peak halved for minutes), and one probe at the start of a run
/// judged later rows against another machine (kernels read 113-118% of it).
struct row_limits {
  double gbps = 0, fp32 = 0, dot = 0;
  void probe(int threads, bool with_dot) {
    gbps = std::max(gbps, bench::probe_read_gbps(threads));
    fp32 = std::max(fp32, bench::probe_fma_gflops(threads));
    if (with_dot) dot = std::max(dot, bench::probe_bf16_dot_gflops(threads));
  }
  double peak(bool uses_dot) const { return uses_dot ? dot : fp32; }
};

/// A kernel call of a row, `run(copy)` on one of `copies` copies of its
/// layer, and its best time.
struct timed_call {
  int copies;
  std::function<void(int)> run;
  double best_ms = 1e300;
};

/// Times `calls` side by side over `reps` rounds, rotating each call's layer
/// copies so weights come from DRAM: every round runs each call once, in an
/// order reversed every other round, so calls compared with each other (a
/// type against another) meet the same phases of a shared machine, whose
/// speed drifts by tens of percent within minutes. Each copy runs once
/// untimed first: on this VM memory written shortly before is read at
/// ~5 GB/s the first time and at full speed after (a plain read loop shows it
/// too, with no page faults), so a freshly built layer's first pass ran up to
/// 2x slower than its next ones (E8A2 F32 at 512 tokens: 50 ms, then 25 ms),
/// which a row of --tokens 512 alone would otherwise charge to the kernel.
void time_side_by_side(int reps, std::vector<timed_call>& calls) {
  for (auto& call : calls)
    for (int c = 0; c < call.copies; ++c) call.run(c);
  for (int r = 0; r < reps; ++r)
    for (std::size_t i = 0; i < calls.size(); ++i) {
      auto& call = calls[r % 2 ? calls.size() - 1 - i : i];
      const auto t0 = std::chrono::steady_clock::now();
      call.run(r % call.copies);
      call.best_ms = std::min(call.best_ms, bench::seconds_since(t0) * 1e3);
    }
}

double best_ms(int reps, int copies, std::function<void(int)> run) {
  std::vector<timed_call> one{{copies, std::move(run)}};
  time_side_by_side(reps, one);
  return one[0].best_ms;
}

matrix eigen_dense(const ffn& f, const matrix& x) {
  const matrix g = x * f.gate.transpose();
  const matrix u = x * f.up.transpose();
  const matrix h = (g.array() / (1.0f + (-g.array()).exp()) * u.array()).matrix();
  return h * f.down.transpose();
}

/// One row of the table: a layer shape at one weight type and token count,
/// its times and the machine's limits measured beside them.
struct ffn_row {
  const moe_shape& shape;
  dtype type;
  index_t tokens;
  int threads;
  double weights, flops;                   ///< the MoE layer's touched weights and FLOPs
  double gbps_limit, peak;                 ///< the row's limits (its type's peak)
  double moe_ms, dense_ms;                 ///< prepared layers; dense for the split shapes
  double moe_unpacked_ms, dense_unpacked_ms, eigen_ms;  ///< plain F32 weights: F32 rows only
  double moe_over_f32, dense_over_f32;     ///< against the F32 layers' times of the same rounds; 0: none
};

double dense_weights() { return 3.0 * double(hidden) * double(intermediate); }

/// The machine as probed when the run starts.
struct run_probes {
  double fp32_peak, bf16_peak;  ///< bf16_peak: 0 when no BF16 row runs
  bench::ridge_probe ridge, bf16_ridge;  ///< the balance point's product, F32; BF16 (vdpbf16ps; none without)
};

void report(const ffn_row& r, const run_probes& start, nlohmann::json& rows) {
  const moe_shape& shape = r.shape;
  const bool f32 = r.type == dtype::f32;
  const double weight_bytes = double(dtype_size(r.type)), bytes = weight_bytes * r.weights;
  const double dense_bytes = weight_bytes * dense_weights(), dense_flops = 2.0 * dense_weights() * double(r.tokens);
  const bool bandwidth_bound = r.flops / bytes < r.peak / r.gbps_limit;
  const double limit_ms = std::max(bytes / r.gbps_limit, r.flops / r.peak) / 1e6;
  // Where a core cannot stream and multiply at once (machine_ridge_overlap near 0), the limit is their sum.
  const double serial_limit_ms = (bytes / r.gbps_limit + r.flops / r.peak) / 1e6;
  const double dense_limit_ms = std::max(dense_bytes / r.gbps_limit, dense_flops / r.peak) / 1e6;
  // The ratio the limits allow. Not the MoE's own bound alone: E8A2 at 64 tokens reads every expert (the
  // dense layer's bytes) and is just bandwidth-bound while the dense layer is compute-bound at 4x its FLOPs,
  // so the byte ratio printed 1.000 where the limits allow 0.25.
  const double ideal = limit_ms / dense_limit_ms;
  const double gbps = bytes / r.moe_ms / 1e6, gflops = r.flops / r.moe_ms / 1e6;
  const double active = double(shape.shared * shape.shared_width + shape.k * shape.width) /
                        double(shape.shared * shape.shared_width + shape.routed * shape.width);
  // Dense columns only for the shapes that split the dense layer, plain-weight
  // columns only for F32, type ratios only where F32 ran beside.
  const auto cell = [](double v, const char* fmt, bool shown) {
    char b[32];
    std::snprintf(b, sizeof b, fmt, v);
    return std::string(shown ? b : "-");
  };
  const bool split = shape.split, vs_f32 = r.moe_over_f32 > 0;
  std::printf("%-14s %-4s %4lld %6.3f %8s %8s %8.2f %8s %8s %6s %6s %8.2f %6.2f %6.2f %6s %6s %6.1f %4.0f %4.0f %6s %6s\n",
              shape.name.c_str(), std::string(dtype_name(r.type)).c_str(), (long long)r.tokens, active,
              cell(r.dense_ms, "%.2f", split).c_str(), cell(r.dense_unpacked_ms, "%.2f", split && f32).c_str(), r.moe_ms,
              cell(r.moe_unpacked_ms, "%.2f", f32).c_str(), cell(r.eigen_ms, "%.2f", split && f32).c_str(),
              cell(r.moe_ms / r.dense_ms, "%.3f", split).c_str(), cell(ideal, "%.3f", split).c_str(), limit_ms, r.moe_ms / limit_ms,
              r.moe_ms / serial_limit_ms,
              cell(r.dense_ms / dense_limit_ms, "%.2f", split).c_str(), cell(r.moe_unpacked_ms / r.moe_ms, "%.2f", f32).c_str(),
              gbps, 100 * gbps / r.gbps_limit, 100 * gflops / r.peak, cell(r.moe_over_f32, "%.3f", vs_f32).c_str(),
              cell(r.dense_over_f32, "%.3f", vs_f32 && split).c_str());
  std::fflush(stdout);
  nlohmann::json row{{"shape", shape.name}, {"dtype", dtype_name(r.type)}, {"tokens", r.tokens}, {"hidden", hidden},
                     {"experts", shape.shared + shape.routed}, {"routed", shape.routed}, {"expert_width", shape.width},
                     {"top_k", shape.k}, {"shared", shape.shared}, {"shared_width", shape.shared_width},
                     {"active_fraction", active}, {"threads", r.threads}, {"moe_ms", r.moe_ms}, {"limit_ms", limit_ms},
                     {"limit_ratio", r.moe_ms / limit_ms}, {"serial_limit_ms", serial_limit_ms},
                     {"serial_ratio", r.moe_ms / serial_limit_ms}, {"bound", bandwidth_bound ? "bandwidth" : "compute"}, {"gbps", gbps},
                     {"gflops", gflops}, {"bandwidth_fraction", gbps / r.gbps_limit}, {"peak_fraction", gflops / r.peak},
                     {"machine_gbps", r.gbps_limit}, {"machine_gflops", r.peak}, {"machine_fp32_gflops", start.fp32_peak},
                     {"machine_bf16_gflops", start.bf16_peak > 0 ? nlohmann::json(start.bf16_peak) : nlohmann::json()}};
  const bench::ridge_probe& ridge = f32 ? start.ridge : start.bf16_ridge;
  if (ridge.tokens > 0) {
    row["machine_ridge_tokens"] = ridge.tokens;
    row["machine_ridge_ratio"] = ridge.ratio;
    row["machine_ridge_overlap"] = ridge.overlap;
  }
  if (f32) row["moe_unpacked_ms"] = r.moe_unpacked_ms;
  if (vs_f32) row["moe_ms_over_f32"] = r.moe_over_f32;
  if (split) {
    row["intermediate"] = intermediate;
    row["dense_ms"] = r.dense_ms;
    row["dense_limit_ms"] = dense_limit_ms;
    row["dense_limit_ratio"] = r.dense_ms / dense_limit_ms;
    row["ratio"] = r.moe_ms / r.dense_ms;
    row["ideal_ratio"] = ideal;
    if (f32) {
      row["dense_unpacked_ms"] = r.dense_unpacked_ms;
      row["eigen_dense_ms"] = r.eigen_ms;
    }
    if (vs_f32) row["dense_ms_over_f32"] = r.dense_over_f32;
  }
  rows.push_back(std::move(row));
}

}  // namespace

int bench_ffn(int argc, char** argv) {
  args a("moeforge-bench ffn",
         "MoE and dense FFN kernels (H=2048 SwiGLU) against Eigen and the machine's limits. Layers are prepared\n"
         "(weights packed once into the kernel's panels, runtime::prepare) as F32 or BF16 values (--dtype); `unpacked`\n"
         "times the same MoE layer from its plain F32 weights (panels packed per call; F32 rows only), with bit-identical\n"
         "results. limit_ms = max(weight bytes touched at the row's dtype / DRAM bandwidth, FLOPs / peak), each the better\n"
         "of two probes taken just before and just after the row; the peak is the FP32 FMA peak, or for BF16 rows over\n"
         "more than " + std::to_string(runtime::detail::bf16_exact_tokens) +
             " tokens the BF16 dot-product peak (vdpbf16ps; BF16 tokens) where the CPU has one.\n"
         "limit_ratio = moe_ms / limit_ms (x_lim); dx_lim is the dense layer's, dense_ms over its own limit. Where the two\n"
         "limits meet, a kernel must stream and multiply at once: the run starts by timing the micro-kernel alone there\n"
         "(weights streamed once to as many tokens as balance them), whose own limit_ratio (machine_ridge_ratio) is a\n"
         "reference for such rows (E8A2 at 64 tokens, 16 an expert on average, on a 430 GFLOP/s, 55 GB/s machine), and\n"
         "the same calls over weights held in L2 tell how much of its streaming a core hides under its arithmetic\n"
         "(machine_ridge_overlap: 1 all of the shorter, 0 none). x_ser (serial_ratio) is moe_ms over their sum,\n"
         "bytes / bandwidth + FLOPs / peak (serial_limit_ms): the limit of a core that cannot do both at once.\n"
         "Every type's layers hold the same weights and a row's types are timed in the same rounds, alternating:\n"
         "m/f32 and d/f32 are a BF16 row's MoE and dense times over the F32 layers', measured side by side (with f32\n"
         "in --dtype; d/f32 for the split shapes, which are compared with the dense layer).");
  a.option("threads", "N", "OpenMP threads (0 = all)", "0")
      .option("tokens", "LIST", "comma-separated token counts (1 to 65536 each)", "1,8,64,512")
      .option("shape", "LIST",
              "more MoE layers beside E8A2, S1A1E8, S3A3E8 (the dense I = 5632 split, also by name with --only-shapes): "
              "qwen3-30b-a3b (128 experts of 768, top 8), dsv2-lite (64 of 1408, top 6, a shared expert of 2816), or HxExI/k[+S]")
      .option("dtype", "LIST", "weight types of the prepared layers, comma-separated (f32, bf16)", "f32,bf16")
      .option("json", "FILE", "also write the rows as a JSON array to FILE")
      .flag("only-shapes", "run only the --shape layers (no dense, E8A2, S1A1E8, S3A3E8)")
      .flag("quick", "fewer repetitions, T = 1 and 64 only");
  if (!a.parse(argc, argv)) return 0;
  const bench::json_output json = bench::json_option(a);
  const bool quick = a.flag_set("quick");
  const long long threads_given = a.get_int("threads", 0, std::numeric_limits<int>::max());
  const auto token_counts = quick ? std::vector<index_t>{1, 64} : a.get_list("tokens", bench::parse_token_count, "a token count");
  std::vector<moe_shape> shapes;
  if (!a.flag_set("only-shapes")) shapes = split_shapes();
  if (a.has("shape"))
    for (auto& shape : a.get_list("shape", parse_shape, "E8A2, S1A1E8, S3A3E8, qwen3-30b-a3b, dsv2-lite, HxExI/k[+S]"))
      shapes.push_back(std::move(shape));
  if (shapes.empty()) throw usage_error("moeforge-bench ffn: --only-shapes needs --shape");
  const std::vector<dtype> types = a.get_list("dtype", parse_weight_dtype, "f32, bf16");
  for (auto t = types.begin(); t != types.end(); ++t)
    if (std::find(types.begin(), t, *t) != t)
      throw usage_error("moeforge-bench ffn: --dtype lists " + std::string(dtype_name(*t)) + " twice");
  const int threads = threads_given > 0 ? int(threads_given) : omp_get_max_threads();
  omp_set_num_threads(threads);
  Eigen::setNbThreads(threads);
  const double run_gbps = bench::probe_read_gbps(threads), fp32_peak = bench::probe_fma_gflops(threads);
  const bool any_bf16 = std::find(types.begin(), types.end(), dtype::bf16) != types.end();
  // No BF16 row, no BF16 peak: without one it would only repeat the FP32 peak under BF16's name.
  const double bf16_peak = !any_bf16 ? 0 : runtime::detail::bf16_dot_available ? bench::probe_bf16_dot_gflops(threads) : fp32_peak;
  run_probes start{fp32_peak, bf16_peak, bench::probe_ridge(threads, run_gbps, fp32_peak), {}};
  if (any_bf16 && runtime::detail::bf16_dot_available) start.bf16_ridge = bench::probe_ridge(threads, run_gbps, bf16_peak, true);
  std::printf("machine at the start: %.1f GB/s DRAM read, %.1f GFLOP/s FP32 FMA peak", run_gbps, fp32_peak);
  if (any_bf16) std::printf(", %.1f GFLOP/s BF16 peak (%s)", bf16_peak, runtime::detail::bf16_dot_available ? "vdpbf16ps" : "widened to FP32");
  std::printf(" (%d threads);\n", threads);
  std::printf("at the balance point streaming and multiply-adds must overlap: the micro-kernel alone, streaming weights to %d tokens,\n"
              "runs at %.2fx its limit, hiding %.0f%% of its streaming or arithmetic under the other (F32)",
              start.ridge.tokens, start.ridge.ratio, 100 * start.ridge.overlap);
  if (start.bf16_ridge.tokens > 0)
    std::printf(", %.2fx, %.0f%% (BF16, %d tokens)", start.bf16_ridge.ratio, 100 * start.bf16_ridge.overlap, start.bf16_ridge.tokens);
  std::printf(", a reference for rows near that balance;\n"
              "each row's limit_ms from probes taken beside it (machine_gbps, machine_gflops, machine_ridge_ratio in --json)\n");

  nlohmann::json rows = nlohmann::json::array();
  std::printf("%-14s %-4s %4s %6s %8s %8s %8s %8s %8s %6s %6s %8s %6s %6s %6s %6s %6s %4s %4s %6s %6s\n", "shape", "type", "T", "active",
              "dense_ms", "dns_unp", "moe_ms", "moe_unp", "eigen_ms", "ratio", "ideal", "limit_ms", "x_lim", "x_ser", "dx_lim", "unp/p", "GB/s",
              "bw%", "pk%", "m/f32", "d/f32");
  // BF16 layers multiply many tokens with vdpbf16ps where the CPU has it (weight_format), few at the FP32 peak.
  const auto uses_dot = [](dtype type, index_t tokens) {
    return type == dtype::bf16 && tokens > runtime::detail::bf16_exact_tokens && runtime::detail::bf16_dot_available;
  };
  // Each type's layers are prepared from the same plain weights, and every
  // row's types are timed in the same rounds: a BF16 row's m/f32 and d/f32
  // are its time over the F32 layer's, both taken in one phase of the machine.
  struct typed_layers {
    dtype type;
    std::vector<runtime::prepared_ffn> dense;
    std::vector<runtime::prepared_moe> moe;
  };
  std::vector<typed_layers> layers;
  for (const dtype type : types) layers.push_back({type, {}, {}});
  const auto f32_layers = std::find_if(layers.begin(), layers.end(), [](const typed_layers& l) { return l.type == dtype::f32; });
  std::mt19937 rng(1234);
  // Builds the copies of a layer (`random()` makes one) that each type's rotation needs (`copies(type)`),
  // into `member` of its layers; a copy wanted by several types is prepared from one plain layer, moved into
  // the last.
  const auto build_copies = [&](auto&& random, auto&& copies, auto member) {
    int most = 0;
    for (const auto& l : layers) most = std::max(most, copies(l.type));
    for (int c = 0; c < most; ++c) {
      auto plain = random();
      std::vector<typed_layers*> wanting;
      for (auto& l : layers)
        if (copies(l.type) > c) wanting.push_back(&l);
      for (std::size_t i = 0; i < wanting.size(); ++i)
        (wanting[i]->*member).push_back(runtime::prepare(i + 1 < wanting.size() ? plain : std::move(plain), wanting[i]->type));
    }
  };
  if (std::any_of(shapes.begin(), shapes.end(), [](const moe_shape& s) { return s.split; }))
    build_copies([&] { return random_ffn(intermediate, rng); },
                 [&](dtype t) { return copies_for(t, dense_weights(), ncopies); }, &typed_layers::dense);
  for (const auto& shape : shapes) {
    const double decode_weights = 3.0 * double(hidden) * double(shape.k * shape.width + shape.shared * shape.shared_width);
    for (auto& l : layers) l.moe.clear();
    const int built = moe_copies_within(3.0 * double(hidden) * double(shape.routed * shape.width + shape.shared * shape.shared_width));
    build_copies([&] { return random_moe(shape, rng); },
                 [&](dtype t) { return copies_for(t, decode_weights, built); }, &typed_layers::moe);
    for (const auto& l : layers)
      if (int(l.moe.size()) < copies_needed(l.type, decode_weights))
        std::printf("note: %s %s at one token rotates %d copies, too few to read its weights from DRAM (bw%% above 100 is cache)\n",
                    shape.name.c_str(), std::string(dtype_name(l.type)).c_str(), int(l.moe.size()));
    for (index_t tokens : token_counts) {
      const matrix x = random_matrix(tokens, hidden, 1.0f, rng);
      const auto plan = balanced_plan(layers[0].moe[0].layer(), x, rng);  // the copies share shapes, so one plan fits all
      const auto [weights, flops] = active_cost(layers[0].moe[0].layer(), plan);
      const bool any_dot = std::any_of(types.begin(), types.end(), [&](dtype t) { return uses_dot(t, tokens); });
      matrix y(tokens, hidden);
      row_limits limits;
      limits.probe(threads, any_dot);
      const int reps = quick ? 4 : tokens >= 512 ? 4 : 12;
      std::vector<timed_call> calls;  // per type: its MoE layer, then (split shapes) its dense layer
      for (auto& l : layers) {
        calls.push_back(
            {copies_for(l.type, weights, int(l.moe.size())), [&](int c) { runtime::moe_forward(l.moe[std::size_t(c)], plan, x, y); }});
        if (shape.split)
          calls.push_back({copies_for(l.type, dense_weights(), int(l.dense.size())),
                           [&](int c) { runtime::dense_forward(l.dense[std::size_t(c)], x, y); }});
      }
      time_side_by_side(reps, calls);
      const std::size_t per_type = shape.split ? 2 : 1;
      const auto moe_ms_of = [&](std::size_t i) { return calls[i * per_type].best_ms; };
      const auto dense_ms_of = [&](std::size_t i) { return shape.split ? calls[i * per_type + 1].best_ms : 0.0; };
      // The same F32 layers from their plain weights (panels packed per call), and Eigen's dense product.
      double moe_unpacked_ms = 0, dense_unpacked_ms = 0, eigen_ms = 0;
      if (f32_layers != layers.end()) {
        const auto& l = *f32_layers;
        moe_unpacked_ms = best_ms(reps, copies_for(dtype::f32, weights, int(l.moe.size())),
                                  [&](int c) { runtime::moe_forward(l.moe[std::size_t(c)].layer(), plan, x, y); });
        if (shape.split) {
          const int rotated = copies_for(dtype::f32, dense_weights(), int(l.dense.size()));
          dense_unpacked_ms = best_ms(reps, rotated, [&](int c) { runtime::dense_forward(l.dense[std::size_t(c)].weights(), x, y); });
          eigen_ms = best_ms(reps, rotated, [&](int c) { y = eigen_dense(l.dense[std::size_t(c)].weights(), x); });
        }
      }
      limits.probe(threads, any_dot);
      const std::size_t f32_index = std::size_t(f32_layers - layers.begin());
      for (std::size_t i = 0; i < layers.size(); ++i) {
        const dtype type = layers[i].type;
        const bool f32 = type == dtype::f32, beside_f32 = !f32 && f32_layers != layers.end();
        const double moe_ms = moe_ms_of(i), dense_ms = dense_ms_of(i);
        report({shape, type, tokens, threads, weights, flops, limits.gbps, limits.peak(uses_dot(type, tokens)), moe_ms, dense_ms,
                f32 ? moe_unpacked_ms : 0, f32 ? dense_unpacked_ms : 0, f32 ? eigen_ms : 0,
                beside_f32 ? moe_ms / moe_ms_of(f32_index) : 0, beside_f32 && shape.split ? dense_ms / dense_ms_of(f32_index) : 0},
               start, rows);
      }
    }
  }
  json.write(rows);
  return 0;
}

}  // namespace moeforge::cli
