// moeforge-bench ffn: the MoE and dense FFN kernels, prepared and from plain
// weights, against Eigen and against this machine's measured DRAM bandwidth
// and FP32 FMA peak, on cold weights.
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "machine.hpp"
#include "moeforge/runtime/dense_ffn.hpp"
#include "moeforge/runtime/moe_ffn.hpp"
#include "moeforge/runtime/prepared.hpp"

namespace moeforge::cli {

namespace {

constexpr index_t hidden = 2048, intermediate = 5632;
// Layer copies rotated so each timed call reads its weights from DRAM: a
// call that reads under 3x the 32 MiB L3 rotates two (dense) or four (MoE: a
// decode step touches a quarter of an E8A2 copy). A call that reads more
// needs one, and gets one: rotating copies of a layer that size adds
// nothing against the caches, but on this VM memory not read for a while
// reads slower (Qwen3-30B-A3B's BF16 layer at 64 tokens, 1.2 GB a call: 34 ms
// rotating four copies, 22-24 ms reusing one), which the bandwidth probe,
// reading one buffer over and over, does not pay either.
constexpr int ncopies = 2, moe_copies = 4;
constexpr double cold_bytes = 96e6;
/// How many of `built` copies a call touching `bytes` of weights rotates.
int copies_for(double bytes, int built) { return bytes >= cold_bytes ? 1 : built; }

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
  return {name, routed, w, k, shared, w, true};
}

/// `qwen3-30b-a3b`, `dsv2-lite`, or the form HxExI/k[+S] (H must be 2048; S a
/// shared expert's width), e.g. 2048x64x1408/6+2816.
moe_shape parse_shape(const std::string& text) {
  if (text == "qwen3-30b-a3b") return {text, 128, 768, 8};
  if (text == "dsv2-lite") return {text, 64, 1408, 6, 1, 2816};
  long long h = 0, e = 0, i = 0, k = 0, s = 0;
  char tail = 0;
  const int got = std::sscanf(text.c_str(), "%lldx%lldx%lld/%lld+%lld%c", &h, &e, &i, &k, &s, &tail);
  if ((got != 4 && got != 5) || h != hidden || e < 1 || i < 1 || k < 1 || k > e || s < 0)
    throw config_error("'" + text + "': expected qwen3-30b-a3b, dsv2-lite or HxExI/k[+S] with H = " + std::to_string(hidden) +
                       ", 1 <= k <= E");
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

/// Weight bytes the plan touches (`weight_bytes` per weight) and the FLOPs it does.
std::pair<double, double> active_cost(const moe_layer& m, const runtime::routing_plan& plan, double weight_bytes) {
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
  return {weights * weight_bytes, flops};
}

/// The machine's limits beside one row: DRAM read bandwidth and the row's
/// arithmetic peak (FP32 FMA, or BF16 dot products), each the better of the
/// probes taken just before and just after the row's timings. On a shared
/// machine both drift (this VM's bandwidth between 30 and 57 GB/s within one
/// run, its FMA peak halved for minutes), and one probe at the start of a run
/// judged later rows against another machine (kernels read 113-118% of it).
struct row_limits {
  double gbps = 0, peak = 0;
  void probe(int threads, bool dot) {
    gbps = std::max(gbps, bench::probe_read_gbps(threads));
    peak = std::max(peak, dot ? bench::probe_bf16_dot_gflops(threads) : bench::probe_fma_gflops(threads));
  }
};

/// Best time in ms of `run(copy)` over `reps`, rotating the layer copies so
/// weights come from DRAM. Each copy runs once untimed first: on this VM
/// memory written shortly before is read at ~5 GB/s the first time and at
/// full speed after (a plain read loop shows it too, with no page faults),
/// so a freshly built layer's first pass ran up to 2x slower than its next
/// ones (E8A2 F32 at 512 tokens: 50 ms, then 25 ms), which a row of
/// --tokens 512 alone would otherwise charge to the kernel.
template <class F>
double best_ms(int reps, int copies, F&& run) {
  for (int c = 0; c < copies; ++c) run(c);
  double best = 1e300;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    run(r % copies);
    best = std::min(best, bench::seconds_since(t0) * 1e3);
  }
  return best;
}

matrix eigen_dense(const ffn& f, const matrix& x) {
  const matrix g = x * f.gate.transpose();
  const matrix u = x * f.up.transpose();
  const matrix h = (g.array() / (1.0f + (-g.array()).exp()) * u.array()).matrix();
  return h * f.down.transpose();
}

/// A token count of --tokens: a positive integer.
index_t parse_token_count(const std::string& text) {
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (end != text.c_str() + text.size() || v < 1) throw config_error("'" + text + "' is not a positive token count");
  return index_t(v);
}

}  // namespace

int bench_ffn(int argc, char** argv) {
  args a("moeforge-bench ffn",
         "MoE and dense FFN kernels (H=2048 SwiGLU) against Eigen and the machine's limits. Layers are prepared\n"
         "(weights packed once into the kernel's panels, runtime::prepare) as F32 or BF16 values (--dtype); `unpacked`\n"
         "times the same MoE layer from its plain F32 weights (panels packed per call; F32 rows only), with bit-identical\n"
         "results. limit_ms = max(weight bytes touched at the row's dtype / DRAM bandwidth, FLOPs / peak), each the better\n"
         "of two probes taken just before and just after the row; the peak is the FP32 FMA peak, or for BF16 rows over\n"
         "more than 4 tokens the BF16 dot-product peak (vdpbf16ps; BF16 tokens) where the CPU has one.\n"
         "limit_ratio = moe_ms / limit_ms (x_lim); dx_lim is the dense layer's, dense_ms over its own limit.");
  a.option("threads", "N", "OpenMP threads (0 = all)", "0")
      .option("tokens", "LIST", "comma-separated token counts", "1,8,64,512")
      .option("shape", "LIST",
              "more MoE layers beside E8A2, S1A1E8, S3A3E8 (the dense I = 5632 split): qwen3-30b-a3b (128 experts of 768, "
              "top 8), dsv2-lite (64 of 1408, top 6, a shared expert of 2816), or HxExI/k[+S]")
      .option("dtype", "LIST", "weight types of the prepared layers, comma-separated (f32, bf16)", "f32,bf16")
      .option("json", "FILE", "also write one JSON object per row to FILE")
      .flag("only-shapes", "run only the --shape layers (no dense, E8A2, S1A1E8, S3A3E8)")
      .flag("quick", "fewer repetitions, T = 1 and 64 only");
  if (!a.parse(argc, argv)) return 0;
  const bool quick = a.flag_set("quick");
  const int threads = a.get_int("threads") > 0 ? int(a.get_int("threads")) : omp_get_max_threads();
  omp_set_num_threads(threads);
  Eigen::setNbThreads(threads);
  const auto token_counts = quick ? std::vector<index_t>{1, 64} : a.get_list("tokens", parse_token_count, "a positive token count");
  std::vector<moe_shape> shapes;
  if (!a.flag_set("only-shapes"))
    shapes = {split_shape("E8A2", 0, 8, 2), split_shape("S1A1E8", 1, 7, 1), split_shape("S3A3E8", 3, 5, 3)};
  if (a.has("shape"))
    for (auto& shape : a.get_list("shape", parse_shape, "qwen3-30b-a3b, dsv2-lite, HxExI/k[+S]")) shapes.push_back(std::move(shape));
  const double run_gbps = bench::probe_read_gbps(threads), fp32_peak = bench::probe_fma_gflops(threads);
  const std::vector<dtype> types = a.get_list("dtype", parse_weight_dtype, "f32, bf16");
  const bool any_bf16 = std::find(types.begin(), types.end(), dtype::bf16) != types.end();
  const double bf16_peak = any_bf16 && runtime::detail::bf16_dot_available ? bench::probe_bf16_dot_gflops(threads) : fp32_peak;
  std::printf("machine at the start: %.1f GB/s DRAM read, %.1f GFLOP/s FP32 FMA peak, %.1f GFLOP/s BF16 peak (%s) (%d threads);\n"
              "each row's limit_ms from probes taken beside it (machine_gbps, machine_gflops in --json)\n",
              run_gbps, fp32_peak, bf16_peak, runtime::detail::bf16_dot_available ? "vdpbf16ps" : "widened to FP32", threads);


  std::ofstream json;
  std::string json_tmp;
  if (a.has("json")) {
    json_tmp = a.get("json") + ".tmp";
    json.open(json_tmp);
    if (!json) throw io_error("cannot write '" + json_tmp + "'");
  }
  std::printf("%-14s %-4s %4s %6s %8s %8s %8s %8s %8s %6s %6s %8s %6s %6s %6s %6s %4s %4s\n", "shape", "type", "T", "active", "dense_ms",
              "dns_unp", "moe_ms", "moe_unp", "eigen_ms", "ratio", "ideal", "limit_ms", "x_lim", "dx_lim", "unp/p", "GB/s", "bw%", "pk%");
  for (const dtype type : types) {
    const bool f32 = type == dtype::f32;  // the unpacked and Eigen columns (plain F32 weights) only once
    const double weight_bytes = double(dtype_size(type));
    // BF16 layers multiply many tokens with vdpbf16ps where the CPU has it (weight_format), few at the FP32 peak.
    const auto uses_dot = [&](index_t tokens) { return !f32 && tokens > runtime::detail::bf16_exact_tokens && runtime::detail::bf16_dot_available; };
    std::mt19937 rng(1234);  // the same weights for every type
    std::vector<runtime::prepared_ffn> dense;
    const bool with_dense = std::any_of(shapes.begin(), shapes.end(), [](const moe_shape& s) { return s.split; });
    for (int c = 0; with_dense && c < ncopies; ++c) dense.push_back(runtime::prepare(random_ffn(intermediate, rng), type));
    const double dense_weights = 3.0 * double(hidden) * double(intermediate), dense_bytes = weight_bytes * dense_weights;
    for (const auto& shape : shapes) {
      std::vector<runtime::prepared_moe> moe;
      const double expert_bytes = weight_bytes * 3.0 * double(hidden) * double(shape.width);
      const double decode_bytes = double(shape.k) * expert_bytes + weight_bytes * 3.0 * double(hidden) * double(shape.shared * shape.shared_width);
      const int copies = copies_for(decode_bytes, moe_copies);
      for (int c = 0; c < copies; ++c) moe.push_back(runtime::prepare(random_moe(shape, rng), type));
      for (index_t tokens : token_counts) {
        const matrix x = random_matrix(tokens, hidden, 1.0f, rng);
        const auto plan = balanced_plan(moe[0].layer(), x, rng);  // the copies share shapes, so one plan fits all
        matrix y(tokens, hidden);
        const bool dot = uses_dot(tokens);
        row_limits limits;
        limits.probe(threads, dot);
        const int reps = quick ? 4 : tokens >= 512 ? 4 : 12;
        double dense_ms = 0, dense_unpacked_ms = 0, eigen_ms = 0, unpacked_ms = 0;
        if (shape.split) {
          const int dense_rotated = copies_for(dense_bytes, ncopies);
          dense_ms = best_ms(reps, dense_rotated, [&](int c) { runtime::dense_forward(dense[std::size_t(c)], x, y); });
          if (f32) {
            dense_unpacked_ms = best_ms(reps, dense_rotated, [&](int c) { runtime::dense_forward(dense[std::size_t(c)].weights(), x, y); });
            eigen_ms = best_ms(reps, dense_rotated, [&](int c) { y = eigen_dense(dense[std::size_t(c)].weights(), x); });
          }
        }
        const auto [bytes, flops] = active_cost(moe[0].layer(), plan, weight_bytes);
        const int rotated = copies_for(bytes, copies);
        const double moe_ms = best_ms(reps, rotated, [&](int c) { runtime::moe_forward(moe[std::size_t(c)], plan, x, y); });
        if (f32) unpacked_ms = best_ms(reps, rotated, [&](int c) { runtime::moe_forward(moe[std::size_t(c)].layer(), plan, x, y); });
        limits.probe(threads, dot);
        const double gbps_limit = limits.gbps, peak = limits.peak;
        const double dense_flops = 2.0 * dense_weights * double(tokens);
        const bool bandwidth_bound = flops / bytes < peak / gbps_limit;
        const double ideal = bandwidth_bound ? bytes / dense_bytes : flops / dense_flops;
        const double limit_ms = std::max(bytes / gbps_limit, flops / peak) / 1e6;
        const double dense_limit_ms = std::max(dense_bytes / gbps_limit, dense_flops / peak) / 1e6;
        const double gbps = bytes / moe_ms / 1e6, gflops = flops / moe_ms / 1e6;
        const double active = double(shape.shared * shape.shared_width + shape.k * shape.width) /
                              double(shape.shared * shape.shared_width + shape.routed * shape.width);
        // Dense columns only for the shapes that split the dense layer; plain-weight columns only for F32.
        const auto cell = [&](double v, const char* fmt, bool shown = true) {
          char b[32];
          std::snprintf(b, sizeof b, fmt, v);
          return std::string(shape.split && shown ? b : "-");
        };
        const auto plain_cell = [&](double v, const char* fmt) {
          char b[32];
          std::snprintf(b, sizeof b, fmt, v);
          return std::string(f32 ? b : "-");
        };
        std::printf("%-14s %-4s %4lld %6.3f %8s %8s %8.2f %8s %8s %6s %6s %8.2f %6.2f %6s %6s %6.1f %4.0f %4.0f\n", shape.name.c_str(),
                    std::string(dtype_name(type)).c_str(), (long long)tokens, active, cell(dense_ms, "%.2f").c_str(),
                    cell(dense_unpacked_ms, "%.2f", f32).c_str(), moe_ms, plain_cell(unpacked_ms, "%.2f").c_str(),
                    cell(eigen_ms, "%.2f", f32).c_str(), cell(moe_ms / dense_ms, "%.3f").c_str(), cell(ideal, "%.3f").c_str(), limit_ms,
                    moe_ms / limit_ms, cell(dense_ms / dense_limit_ms, "%.2f").c_str(), plain_cell(unpacked_ms / moe_ms, "%.2f").c_str(), gbps,
                    100 * gbps / gbps_limit, 100 * gflops / peak);
        std::fflush(stdout);
        if (json) {
          nlohmann::json row{{"shape", shape.name}, {"dtype", dtype_name(type)}, {"tokens", tokens}, {"hidden", hidden},
                             {"experts", shape.shared + shape.routed}, {"routed", shape.routed}, {"expert_width", shape.width},
                             {"top_k", shape.k}, {"shared", shape.shared}, {"shared_width", shape.shared_width},
                             {"active_fraction", active}, {"threads", threads}, {"moe_ms", moe_ms}, {"limit_ms", limit_ms},
                             {"limit_ratio", moe_ms / limit_ms}, {"bound", bandwidth_bound ? "bandwidth" : "compute"}, {"gbps", gbps},
                             {"gflops", gflops}, {"bandwidth_fraction", gbps / gbps_limit}, {"peak_fraction", gflops / peak},
                             {"machine_gbps", gbps_limit}, {"machine_gflops", peak}, {"machine_fp32_gflops", fp32_peak},
                             {"machine_bf16_gflops", bf16_peak}};
          if (f32) row["moe_unpacked_ms"] = unpacked_ms;
          if (shape.split) {
            row["intermediate"] = intermediate;
            row["dense_ms"] = dense_ms;
            row["dense_limit_ms"] = dense_limit_ms;
            row["dense_limit_ratio"] = dense_ms / dense_limit_ms;
            row["ratio"] = moe_ms / dense_ms;
            row["ideal_ratio"] = ideal;
            if (f32) {
              row["dense_unpacked_ms"] = dense_unpacked_ms;
              row["eigen_dense_ms"] = eigen_ms;
            }
          }
          json << row << "\n";
        }
      }
    }
  }
  if (json) {
    json.close();
    if (!json || std::rename(json_tmp.c_str(), a.get("json").c_str()) != 0) throw io_error("cannot write '" + a.get("json") + "'");
  }
  return 0;
}

}  // namespace moeforge::cli
