// moeforge-bench convert: time and memory of converting one dense FFN layer
// (random weights, random calibration inputs) with CMoE: the paper's method,
// and with --preset best moeforge's recipe measured in the same run against it.
#include <chrono>
#include <fstream>
#include <iostream>
#include <random>
#include <string>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "json_out.hpp"
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
      .option("preset", "paper|best",
              "the recipe; best also converts with paper first, in the same run, and reports the ratios of time and "
              "memory (best's size-aware rule decides which fitting steps run at this shape)",
              "paper")
      .flag("no-peak", "skip the FMA-peak probe (fraction of peak not reported)")
      .option("json", "FILE", "also write the row as a JSON array to FILE");
  if (!a.parse(argc, argv)) return 0;
  const index_t h = a.get_int("hidden", 1), n = a.get_int("intermediate", 1), t = a.get_int("tokens", 1);
  convert::cmoe_options opt;
  opt.config = a.get_parsed("config", [n](const std::string& text) {
    const convert::cmoe_config c = convert::parse_cmoe_config(text);
    convert::validate(c, n);
    return c;
  });
  opt.ka = a.get_int("ka", 1);
  opt.block = a.get_int("block", 1);
  const convert::cmoe_preset preset = a.get_parsed("preset", convert::parse_cmoe_preset);
  const bench::json_output json = bench::json_option(a);

  ffn f;
  f.gate = random_matrix(n, h, 1);
  f.up = random_matrix(n, h, 2);
  f.down = random_matrix(h, n, 3);
  const matrix x = random_matrix(t, h, 4);
  const double layer_mb = double(parameter_count(f)) * 4.0 / (1024.0 * 1024.0);
  const double weights_mb = layer_mb + double(x.size()) * 4.0 / (1024.0 * 1024.0);

  // One conversion: its seconds, stages, peak RSS (whole process) and what it added.
  struct run {
    nlohmann::json j;
    double seconds = 0, rss = 0, added = 0;
  };
  bool peak_reset = true;
  auto convert_with = [&](convert::cmoe_preset p) {
    convert::cmoe_options o = opt;
    o.fit = convert::preset_fit(p);
    peak_reset = bench::reset_peak_rss() && peak_reset;
    const double rss_before = peak_rss_mb();
    const auto start = std::chrono::steady_clock::now();
    const auto res = convert::cmoe(f, x, o);
    run r;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    r.rss = peak_rss_mb();
    r.added = r.rss - rss_before;
    r.j["preset"] = std::string(convert::preset_name(p));
    r.j["seconds"] = r.seconds;
    r.j["stage_seconds"] = nlohmann::json::object();
    for (const auto& [stage, s] : res.report.stage_seconds) r.j["stage_seconds"][stage] = s;
    r.j["assignment_cost"] = res.report.assignment_cost;
    r.j["peak_rss_mb"] = r.rss;
    r.j["rss_above_inputs_mb"] = r.added;
    r.j["rss_above_layer_weights_mb"] = r.rss - layer_mb;
    if (res.report.fit.fits()) r.j["fit"] = convert::to_json(res.report)["fit"];
    return r;
  };
  const run paper = convert_with(convert::cmoe_preset::paper);
  const run best = preset == convert::cmoe_preset::best ? convert_with(preset) : run{};
  const run& main_run = preset == convert::cmoe_preset::best ? best : paper;

  nlohmann::json j = main_run.j;
  j["hidden"] = h;
  j["intermediate"] = n;
  j["tokens"] = t;
  j["config"] = convert::to_string(opt.config);
  j["ka"] = opt.ka;
  j["inputs_mb"] = weights_mb;
  j["layer_weights_mb"] = layer_mb;
  j["peak_reset_between_runs"] = peak_reset;
  if (preset == convert::cmoe_preset::best) {
    j["paper"] = paper.j;
    j["time_vs_paper"] = best.seconds / paper.seconds;
  }
  // The markers' two GEMMs [T,H]x[H,I] bound the paper's time: 2·2·T·H·I FLOPs.
  const double gemm_flop = 4.0 * double(t) * double(h) * double(n);
  const double markers_s = paper.j["stage_seconds"].value("markers", 0.0);
  j["markers_gemm_gflop"] = gemm_flop / 1e9;
  j["markers_gflop_s"] = markers_s > 0 ? gemm_flop / markers_s / 1e9 : 0.0;
  if (!a.flag_set("no-peak")) {
    const double peak = bench::probe_fma_gflops(omp_get_max_threads());
    j["fma_peak_gflop_s"] = peak;
    j["markers_fraction_of_peak"] = markers_s > 0 ? gemm_flop / markers_s / 1e9 / peak : 0.0;
    j["gemm_seconds_at_peak"] = gemm_flop / 1e9 / peak;
  }
  json.write(nlohmann::json::array({j}));
  std::cout << "convert " << j["config"].get<std::string>() << " H=" << h << " I=" << n << " T=" << t << " (weights + inputs "
            << weights_mb << " MB, layer weights " << layer_mb << " MB)\n";
  for (const run* r : {&paper, &best}) {
    if (r->j.empty()) continue;
    std::cout << "  " << r->j["preset"].get<std::string>() << ": " << r->seconds << " s";
    for (const auto& [stage, s] : r->j["stage_seconds"].items()) std::cout << "  " << stage << " " << s.get<double>() << " s";
    std::cout << "\n    peak RSS " << r->rss << " MB (" << r->rss - layer_mb << " MB above the layer's weights; the conversion added "
              << r->added << " MB)\n";
  }
  if (preset == convert::cmoe_preset::best)
    std::cout << "  best / paper: time " << j["time_vs_paper"].get<double>() << "x"
              << (peak_reset ? "" : " (peak RSS could not be reset between runs: best's peak includes paper's)") << "\n";
  std::cout << "markers GEMM " << j["markers_gemm_gflop"].get<double>() << " GFLOP at " << j["markers_gflop_s"].get<double>() << " GFLOP/s";
  if (j.contains("fma_peak_gflop_s"))
    std::cout << " = " << 100.0 * j["markers_fraction_of_peak"].get<double>() << "% of the " << j["fma_peak_gflop_s"].get<double>()
              << " GFLOP/s FMA peak (GEMM alone at peak: " << j["gemm_seconds_at_peak"].get<double>() << " s)";
  std::cout << "\n";
  return 0;
}

}  // namespace moeforge::cli
