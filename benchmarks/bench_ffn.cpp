// moeforge-bench ffn: the MoE and dense FFN kernels against Eigen and against
// this machine's measured DRAM bandwidth and FP32 FMA peak, on cold weights.
#include <omp.h>

#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "machine.hpp"
#include "moeforge/runtime/dense_ffn.hpp"
#include "moeforge/runtime/moe_ffn.hpp"

namespace moeforge::cli {

namespace {

constexpr index_t hidden = 2048, intermediate = 5632;
// Layer copies rotated so each timed call reads its weights from DRAM: a dense
// copy (138 MB) is over 3x the 32 MiB L3, but a decode step touches only a
// quarter of a MoE copy, so the MoE layers need four.
constexpr int ncopies = 2, moe_copies = 4;

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

double ffn_bytes(const ffn& f) { return 4.0 * double(f.gate.size() + f.up.size() + f.down.size()); }

/// A MoE split of the FFN: `shared` always-on experts and top-`k` of `routed`, all of width I/(shared+routed).
struct moe_shape {
  const char* name;
  index_t shared, routed, k;
};

moe_layer random_moe(const moe_shape& s, std::mt19937& rng) {
  const index_t width = intermediate / (s.shared + s.routed);
  moe_layer m;
  m.router.weight = random_matrix(s.routed, hidden, 0.02f, rng);
  m.router.top_k = s.k;
  for (index_t e = 0; e < s.routed; ++e) m.experts.push_back({random_ffn(width, rng), vector(), 0, {}});
  for (index_t e = 0; e < s.shared; ++e) m.shared.push_back({random_ffn(width, rng), vector()});
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

/// Weight bytes the plan touches and the FLOPs it does.
std::pair<double, double> active_cost(const moe_layer& m, const runtime::routing_plan& plan) {
  double bytes = 0, flops = 0;
  for (const auto& s : m.shared) {
    bytes += ffn_bytes(s.weights);
    flops += 2.0 * ffn_bytes(s.weights) / 4.0 * double(plan.tokens);
  }
  for (index_t e = 0; e < m.num_experts(); ++e) {
    const index_t n = plan.offsets[std::size_t(e + 1)] - plan.offsets[std::size_t(e)];
    if (n == 0) continue;
    const auto& f = m.experts[std::size_t(e)].weights;
    bytes += ffn_bytes(f);
    flops += 2.0 * ffn_bytes(f) / 4.0 * double(n);
  }
  return {bytes, flops};
}

/// Best time in ms of `run(copy)` over `reps`, rotating the layer copies so weights come from DRAM.
template <class F>
double best_ms(int reps, int copies, F&& run) {
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

std::vector<index_t> parse_list(const std::string& s) {
  std::vector<index_t> v;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) v.push_back(std::stoll(item));
  return v;
}

}  // namespace

int bench_ffn(int argc, char** argv) {
  args a("moeforge-bench ffn", "MoE and dense FFN kernels (H=2048, I=5632 SwiGLU FP32) against Eigen and the machine's limits.");
  a.option("threads", "N", "OpenMP threads (0 = all)", "0")
      .option("tokens", "LIST", "comma-separated token counts", "1,8,64,512")
      .option("json", "FILE", "also write one JSON object per row to FILE")
      .flag("quick", "fewer repetitions, T = 1 and 64 only");
  if (!a.parse(argc, argv)) return 0;
  const bool quick = a.flag_set("quick");
  const int threads = a.get_int("threads") > 0 ? int(a.get_int("threads")) : omp_get_max_threads();
  omp_set_num_threads(threads);
  Eigen::setNbThreads(threads);
  const auto token_counts = quick ? std::vector<index_t>{1, 64} : parse_list(a.get("tokens"));
  const double gbps_limit = bench::probe_read_gbps(threads), peak = bench::probe_fma_gflops(threads);
  std::printf("machine: %.1f GB/s DRAM read, %.1f GFLOP/s FP32 FMA peak (%d threads)\n", gbps_limit, peak, threads);

  std::mt19937 rng(1234);
  std::vector<ffn> dense;
  for (int c = 0; c < ncopies; ++c) dense.push_back(random_ffn(intermediate, rng));
  const double dense_bytes = ffn_bytes(dense[0]);

  std::ofstream json;
  std::string json_tmp;
  if (a.has("json")) {
    json_tmp = a.get("json") + ".tmp";
    json.open(json_tmp);
    if (!json) throw io_error("cannot write '" + json_tmp + "'");
  }
  std::printf("%-8s %5s %7s %9s %9s %9s %6s %6s %7s %7s %5s %5s\n", "shape", "T", "active", "dense_ms", "moe_ms", "eigen_ms",
              "ratio", "ideal", "GB/s", "GFLOP/s", "bw%", "pk%");
  const moe_shape shapes[] = {{"E8A2", 0, 8, 2}, {"S1A1E8", 1, 7, 1}, {"S3A3E8", 3, 5, 3}};
  for (const auto& shape : shapes) {
    std::vector<moe_layer> moe;
    for (int c = 0; c < moe_copies; ++c) moe.push_back(random_moe(shape, rng));
    for (index_t tokens : token_counts) {
      const matrix x = random_matrix(tokens, hidden, 1.0f, rng);
      const auto plan = balanced_plan(moe[0], x, rng);  // the copies share shapes, so one plan fits all
      matrix y(tokens, hidden);
      const int reps = quick ? 4 : tokens >= 512 ? 4 : 12;
      const double dense_ms = best_ms(reps, ncopies, [&](int c) { runtime::dense_forward(dense[std::size_t(c)], x, y); });
      const double moe_ms = best_ms(reps, moe_copies, [&](int c) { runtime::moe_forward(moe[std::size_t(c)], plan, x, y); });
      const double eigen_ms = best_ms(reps, ncopies, [&](int c) { y = eigen_dense(dense[std::size_t(c)], x); });
      const auto [bytes, flops] = active_cost(moe[0], plan);
      const double dense_flops = 2.0 * dense_bytes / 4.0 * double(tokens);
      const bool bandwidth_bound = flops / bytes < peak / gbps_limit;
      const double ideal = bandwidth_bound ? bytes / dense_bytes : flops / dense_flops;
      const double gbps = bytes / moe_ms / 1e6, gflops = flops / moe_ms / 1e6;
      const double active = double(shape.shared + shape.k) / double(shape.shared + shape.routed);
      std::printf("%-8s %5lld %7.3f %9.2f %9.2f %9.2f %6.3f %6.3f %7.1f %7.1f %5.0f %5.0f\n", shape.name, (long long)tokens, active,
                  dense_ms, moe_ms, eigen_ms, moe_ms / dense_ms, ideal, gbps, gflops, 100 * gbps / gbps_limit, 100 * gflops / peak);
      std::fflush(stdout);
      if (json)
        json << nlohmann::json{{"shape", shape.name}, {"tokens", tokens}, {"hidden", hidden}, {"intermediate", intermediate},
                               {"experts", shape.shared + shape.routed}, {"top_k", shape.k}, {"shared", shape.shared},
                               {"active_fraction", active}, {"threads", threads}, {"dense_ms", dense_ms}, {"moe_ms", moe_ms},
                               {"eigen_dense_ms", eigen_ms}, {"ratio", moe_ms / dense_ms}, {"ideal_ratio", ideal},
                               {"bound", bandwidth_bound ? "bandwidth" : "compute"}, {"gbps", gbps}, {"gflops", gflops},
                               {"bandwidth_fraction", gbps / gbps_limit}, {"peak_fraction", gflops / peak},
                               {"machine_gbps", gbps_limit}, {"machine_gflops", peak}}
                    << "\n";
    }
  }
  if (json) {
    json.close();
    if (!json || std::rename(json_tmp.c_str(), a.get("json").c_str()) != 0) throw io_error("cannot write '" + a.get("json") + "'");
  }
  return 0;
}

}  // namespace moeforge::cli
