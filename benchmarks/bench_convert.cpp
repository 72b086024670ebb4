// moeforge-bench convert: time and memory of converting one dense FFN layer
// (random weights, random calibration inputs) with CMoE.
#include <chrono>
#include <fstream>
#include <iostream>
#include <random>
#include <string>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "moeforge/convert/cmoe.hpp"

namespace moeforge::cli {

namespace {

double peak_rss_mb() {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0.0;
}

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
      .flag("json", "print one JSON object instead of a table");
  if (!a.parse(argc, argv)) return 0;
  const index_t h = a.get_int("hidden"), n = a.get_int("intermediate"), t = a.get_int("tokens");
  if (h < 1 || n < 1 || t < 1) throw usage_error("moeforge-bench convert: --hidden, --intermediate and --tokens must be positive");
  convert::cmoe_options opt;
  opt.config = convert::parse_cmoe_config(a.get("config"));
  opt.ka = a.get_int("ka");

  ffn f;
  f.gate = random_matrix(n, h, 1);
  f.up = random_matrix(n, h, 2);
  f.down = random_matrix(h, n, 3);
  const matrix x = random_matrix(t, h, 4);
  const double rss_before = peak_rss_mb();
  const double weights_mb = double(parameter_count(f) + x.size()) * 4.0 / (1024.0 * 1024.0);

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
  if (a.flag_set("json")) {
    std::cout << j.dump() << "\n";
  } else {
    std::cout << "convert " << j["config"].get<std::string>() << " H=" << h << " I=" << n << " T=" << t << ": " << seconds << " s";
    for (const auto& [stage, s] : res.report.stage_seconds) std::cout << "  " << stage << " " << s << " s";
    std::cout << "\npeak RSS " << rss << " MB (weights + inputs " << weights_mb << " MB, conversion added " << rss - rss_before << " MB)\n";
  }
  return 0;
}

}  // namespace moeforge::cli
