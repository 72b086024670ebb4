// moeforge-bench convert: time and memory of converting one dense FFN layer
// (random weights, random calibration inputs) with CMoE.
#include <chrono>
#include <fstream>
#include <iostream>
#include <random>
#include <string>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "machine.hpp"
#include "moeforge/convert/cmoe.hpp"
#include "process.hpp"

namespace moeforge::cli {

namespace {

double peak_rss_mb() { return bench::status_mb("VmHWM:"); }

matrix random_matrix(index_t r, index_t c, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  matrix m(r, c);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = d(rng);
  return m;
}

}  // namespace

int bench_convert(int argc, char** argv) {
  args a("moeforge-bench convert", "Converts one random LLaMA-shaped FFN layer with CMoE; reports seconds and peak memory.");
  a.option("hidden", "H", "hidden size", "4096")
      .option("intermediate", "I", "FFN neurons", "11008")
      .option("tokens", "T", "calibration tokens", "16384")
      .option("config", "S_A_E_", "CMoE configuration", "S2A2E16")
      .option("ka", "K", "markers per token", "10")
      .option("block", "T", "calibration tokens per marker chunk", "1024")
      .flag("no-peak", "skip the FMA-peak probe (fraction of peak not reported)")
      .flag("json", "print one JSON object instead of a table");
  if (!a.parse(argc, argv)) return 0;
  const index_t h = a.get_int("hidden"), n = a.get_int("intermediate"), t = a.get_int("tokens");
  if (h < 1 || n < 1 || t < 1) throw usage_error("moeforge-bench convert: --hidden, --intermediate and --tokens must be positive");
  convert::cmoe_options opt;
  opt.config = convert::parse_cmoe_config(a.get("config"));
  opt.ka = a.get_int("ka");
  opt.block = a.get_int("block");

  ffn f;
  f.gate = random_matrix(n, h, 1);
  f.up = random_matrix(n, h, 2);
  f.down = random_matrix(h, n, 3);
  const matrix x = random_matrix(t, h, 4);
  const double rss_before = peak_rss_mb();
  const double layer_mb = double(parameter_count(f)) * 4.0 / (1024.0 * 1024.0);
  const double weights_mb = layer_mb + double(x.size()) * 4.0 / (1024.0 * 1024.0);

  const auto start = std::chrono::steady_clock::now();
  const auto res = convert::cmoe(f, x, opt);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double rss = peak_rss_mb();

  nlohmann::json j;
  j["hidden"] = h;
  j["intermediate"] = n;
  j["tokens"] = t;
  j["config"] = convert::to_string(opt.config);
  j["ka"] = opt.ka;
  j["seconds"] = seconds;
  j["stage_seconds"] = nlohmann::json::object();
  for (const auto& [stage, s] : res.report.stage_seconds) j["stage_seconds"][stage] = s;
  j["assignment_cost"] = res.report.assignment_cost;
  j["peak_rss_mb"] = rss;
  j["inputs_mb"] = weights_mb;
  j["rss_above_inputs_mb"] = rss - rss_before;
  j["layer_weights_mb"] = layer_mb;
  j["rss_above_layer_weights_mb"] = rss - layer_mb;
  // The markers' two GEMMs [T,H]x[H,I] bound the time: 2·2·T·H·I FLOPs.
  const double gemm_flop = 4.0 * double(t) * double(h) * double(n);
  double markers_s = 0;
  for (const auto& [stage, s] : res.report.stage_seconds)
    if (stage == "markers") markers_s = s;
  j["markers_gemm_gflop"] = gemm_flop / 1e9;
  j["markers_gflop_s"] = markers_s > 0 ? gemm_flop / markers_s / 1e9 : 0.0;
  if (!a.flag_set("no-peak")) {
    const double peak = bench::probe_fma_gflops(omp_get_max_threads());
    j["fma_peak_gflop_s"] = peak;
    j["markers_fraction_of_peak"] = markers_s > 0 ? gemm_flop / markers_s / 1e9 / peak : 0.0;
    j["gemm_seconds_at_peak"] = gemm_flop / 1e9 / peak;
  }
  if (a.flag_set("json")) {
    std::cout << j.dump() << "\n";
  } else {
    std::cout << "convert " << j["config"].get<std::string>() << " H=" << h << " I=" << n << " T=" << t << ": " << seconds << " s";
    for (const auto& [stage, s] : res.report.stage_seconds) std::cout << "  " << stage << " " << s << " s";
    std::cout << "\npeak RSS " << rss << " MB (weights + inputs " << weights_mb << " MB, conversion added " << rss - rss_before << " MB)\n"
              << "markers GEMM " << j["markers_gemm_gflop"].get<double>() << " GFLOP at " << j["markers_gflop_s"].get<double>() << " GFLOP/s";
    if (j.contains("fma_peak_gflop_s"))
      std::cout << " = " << 100.0 * j["markers_fraction_of_peak"].get<double>() << "% of the " << j["fma_peak_gflop_s"].get<double>()
                << " GFLOP/s FMA peak (GEMM alone at peak: " << j["gemm_seconds_at_peak"].get<double>() << " s)";
    std::cout << "\n";
  }
  return 0;
}

}  // namespace moeforge::cli
