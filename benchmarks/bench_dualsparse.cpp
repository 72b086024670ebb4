// moeforge-bench dualsparse: DualSparse-MoE dropping as measured time. The
// speed part runs the Mixtral-shaped layer of `moeforge-bench ffn` with and
// without a drop policy on the same routing and reports the MoE-module
// speedup against its ideal 1/(1 - drop rate).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <random>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "dualsparse_quality.hpp"
#include "json_out.hpp"
#include "machine.hpp"
#include "options.hpp"
#include "stories.hpp"
#include "moeforge/convert/dualsparse.hpp"
#include "moeforge/runtime/moe_ffn.hpp"
#include "moeforge/runtime/prepared.hpp"

namespace moeforge::cli {

// Named (not anonymous) so the unity build of moeforge-bench keeps these
// helpers apart from bench_ffn.cpp's.
namespace dualsparse_bench {

/// The E8A2 layer of `moeforge-bench ffn`: H 2048, the dense I 5632 split into
/// 8 routed SwiGLU experts of 704 neurons, top 2, Mixtral's softmax router.
constexpr index_t hidden = 2048, experts = 8, expert_width = 5632 / experts, top_k = 2;
/// Layer copies rotated per call so weights come from DRAM, as in `moeforge-bench ffn`.
constexpr int copies = 4;

struct speed_options {
  int threads = 1;
  std::vector<index_t> tokens{1, 64, 512};
  std::vector<double> drop_rates{0, 0.1, 0.2, 0.3, 0.4};
  std::vector<drop_kind> policies{drop_kind::one_t, drop_kind::two_t};
  int reps = 15;
  float sigma = 2.0f;    ///< spread of the generated router logits
  float margin = 0.01f;  ///< 2t margin
  double gbps = 0;       ///< measured in-run, reported with the rows
  bool unpacked = false;  ///< time the plain layers (panels packed per call) instead of prepared ones
};

matrix gaussian(index_t r, index_t c, float scale, std::mt19937& rng) {
  std::normal_distribution<float> n(0.0f, scale);
  matrix m(r, c);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = n(rng);
  return m;
}

moe_layer mixtral_layer(std::mt19937& rng) {
  moe_layer m;
  m.router.weight = gaussian(experts, hidden, 0.02f, rng);  // shapes only: the routing is generated
  m.router.top_k = top_k;
  for (index_t e = 0; e < experts; ++e)
    m.experts.push_back({ffn{gaussian(expert_width, hidden, 0.02f, rng), gaussian(expert_width, hidden, 0.02f, rng),
                             gaussian(hidden, expert_width, 0.02f, rng), activation::silu},
                         vector(), 0, {}});
  return m;
}

/// Router probabilities of a trained-looking router: logits i.i.d. N(0, σ²)
/// per token and expert, softmax over the 8 experts.
matrix router_probs(index_t tokens, float sigma, std::mt19937& rng) {
  matrix p = gaussian(tokens, experts, sigma, rng);
  moeforge::detail::softmax_rows(p);
  return p;
}

/// One timed call of the kernel: its tokens and their top-k selection.
struct step {
  matrix x;
  runtime::selection sel;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// The `--help` text of the speed part.
constexpr const char* speed_help =
    "Speed: the E8A2 layer of `moeforge-bench ffn` (H 2048, 8 SwiGLU experts of 704 neurons, top 2, softmax router with\n"
    "renormalised gate weights; random FP32 weights, 4 copies rotated so every call reads its weights from DRAM).\n"
    "Routing: per token, router logits drawn i.i.d. N(0, sigma^2) over the 8 experts (sigma = --sigma, default 2),\n"
    "softmax, top 2. With sigma 2 the normalised second score s2 = p2/(p1+p2) spreads over (0, 0.5] with quartiles\n"
    "about 0.16 / 0.29 / 0.40 (printed per run), a trained router's spread (NAEE's median p2/p1 of about 0.4).\n"
    "For 1t and 2t (margin 0.01) and each target drop rate d, the threshold T is found by bisection on the same\n"
    "routing that is timed; the realised d (FLOP share dropped, a major-only pair counting half) is reported.\n"
    "The layer is the DualSparse layer: every expert partitioned into major and minor halves (parts = {352}), prepared\n"
    "(weights packed once into the kernel's panels; --unpacked: plain weights, packed per call). Full: the same layer\n"
    "without dropping, on the same tokens and routing (the partition changes no work: 352 neurons are whole panels).\n"
    "Timed: moe_forward on a\n"
    "precomputed plan. T = 1 times 128 successive single-token calls (different tokens), T = 64 eight batches,\n"
    "T = 512 two; full and dropped samples alternate (ABBA) --reps times, and the medians are reported.\n";

/// The speed rows: for each token count, policy and target drop rate, the
/// median time of the dropped and of the full layer on the same calls.
std::vector<nlohmann::json> speed(const speed_options& o) {
  std::mt19937 rng(20250818);
  // The DualSparse layer, prepared (its panels restart at the major width,
  // 352 = 11 whole panels, so the full plans compute exactly what the
  // unpartitioned layer would) unless --unpacked asks for the plain weights.
  // layers[0] also makes the plans and calibrates the thresholds.
  std::vector<moe_layer> layers;
  std::vector<runtime::prepared_moe> prepared;
  for (int c = 0; c < copies; ++c) {
    moe_layer m = mixtral_layer(rng);
    for (auto& e : m.experts) e.parts = {e.major_width()};
    if (!o.unpacked) prepared.push_back(runtime::prepare(c == 0 ? m : std::move(m)));
    if (o.unpacked || c == 0) layers.push_back(std::move(m));
  }
  std::vector<nlohmann::json> rows;
  std::printf("%5s %6s %6s %6s %7s %9s %11s %8s %6s %8s\n", "T", "policy", "target", "d", "T_drop", "full_ms", "dropped_ms",
              "speedup", "ideal", ">=0.9x");
  for (const index_t tokens : o.tokens) {
    const int calls = tokens == 1 ? 128 : tokens <= 64 ? 8 : 2;
    std::vector<step> steps(static_cast<std::size_t>(calls));
    std::vector<double> s2;
    for (auto& s : steps) {
      s.x = gaussian(tokens, hidden, 1.0f, rng);
      s.sel = runtime::select_topk(layers[0].router, router_probs(tokens, o.sigma, rng));
      for (index_t t = 0; t < tokens; ++t) s2.push_back(s.sel.prob[std::size_t(t * top_k + 1)] / (s.sel.prob[std::size_t(t * top_k)] + s.sel.prob[std::size_t(t * top_k + 1)]));
    }
    std::sort(s2.begin(), s2.end());
    std::printf("T = %lld: %d calls; s2 quartiles %.3f / %.3f / %.3f\n", (long long)tokens, calls, s2[s2.size() / 4], s2[s2.size() / 2],
                s2[s2.size() * 3 / 4]);
    matrix y(tokens, hidden);
    std::vector<runtime::routing_plan> full_plans;
    for (const auto& s : steps) full_plans.push_back(runtime::make_plan(layers[0], s.sel, s.x));
    // Seconds per call over the steps; the copies share shapes, so one plan fits all.
    const auto run = [&](const std::vector<runtime::routing_plan>& plans) {
      const auto t0 = std::chrono::steady_clock::now();
      for (std::size_t c = 0; c < steps.size(); ++c) {
        if (o.unpacked)
          runtime::moe_forward(layers[c % copies], plans[c], steps[c].x, y);
        else
          runtime::moe_forward(prepared[c % copies], plans[c], steps[c].x, y);
      }
      return bench::seconds_since(t0) / double(steps.size());
    };
    // The routing the thresholds are calibrated on: exactly the timed calls'.
    std::vector<convert::routing_sample> samples;
    for (const auto& s : steps) samples.push_back({&layers[0], s.sel});
    for (const auto kind : o.policies) {
      for (const double target : o.drop_rates) {
        drop_policy d;
        d.kind = kind;
        d.margin = o.margin;
        d.threshold = convert::calibrate_threshold(samples, d, target);
        const double rate = convert::work_under(samples, d).drop_rate();
        std::vector<runtime::routing_plan> plans;
        for (const auto& s : steps) {
          runtime::selection sel = s.sel;
          runtime::apply_drop(d, sel);
          plans.push_back(runtime::make_plan(layers[0], sel, s.x));
        }
        std::vector<double> full, dropped;
        run(full_plans);  // warm-up: page faults, thread team
        for (int r = 0; r < o.reps; ++r) {
          for (int half = 0; half < 2; ++half) {
            const bool drop_first = (r + half) % 2 == 1;  // ABBA order
            (drop_first ? dropped : full).push_back(1e3 * run(drop_first ? plans : full_plans));
          }
        }
        const double full_ms = median(full), dropped_ms = median(dropped);
        const double speedup = full_ms / dropped_ms, ideal = 1.0 / (1.0 - rate);
        const bool ok = speedup >= 0.9 * ideal;
        std::printf("%5lld %6s %6.2f %6.3f %7.4f %9.3f %11.3f %8.3f %6.3f %8s\n", (long long)tokens,
                    std::string(drop_kind_name(kind)).c_str(), target, rate, double(d.threshold), full_ms, dropped_ms, speedup, ideal,
                    ok ? "yes" : "NO");
        std::fflush(stdout);
        rows.push_back({{"kind", "speed"}, {"policy", drop_kind_name(kind)}, {"target_drop_rate", target}, {"drop_rate", rate},
                        {"threshold", d.threshold}, {"margin", kind == drop_kind::two_t ? d.margin : 0.0f}, {"tokens", tokens},
                        {"calls", calls}, {"reps", o.reps}, {"dropped_ms", dropped_ms}, {"full_ms", full_ms}, {"speedup", speedup},
                        {"ideal_speedup", ideal}, {"meets_target", ok}, {"threads", o.threads}, {"hidden", hidden},
                        {"experts", experts}, {"expert_width", expert_width}, {"top_k", top_k}, {"sigma", o.sigma}, {"prepared", !o.unpacked},
                        {"machine_gbps", o.gbps}});
      }
    }
  }
  return rows;
}

/// A policy of --policies: one with a threshold to calibrate to each drop rate (not none).
drop_kind parse_dropping_kind(const std::string& text) {
  for (const drop_kind k : all_drop_kinds)
    if (k != drop_kind::none && text == drop_kind_name(k)) return k;
  throw config_error("drop policy '" + text + "': expected 1t, 2t, naee or top-p");
}

std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string a, b, c;
  in >> a >> b >> c;
  return a.empty() ? "?" : a + " " + b + " " + c;
}

}  // namespace dualsparse_bench

int bench_dualsparse(int argc, char** argv) {
  namespace ds = dualsparse_bench;
  args a("moeforge-bench dualsparse", std::string("DualSparse-MoE: measured kernel speedup at each drop rate.\n\n") + ds::speed_help);
  a.option("threads", "N", "OpenMP threads (0 = all)", "0")
      .option("tokens", "LIST", "speed: comma-separated token counts per call (1 to 65536)", "1,64,512")
      .option("drop-rates", "LIST", "target drop rates, each in [0, 1)", "0,0.1,0.2,0.3,0.4")
      .option("policies", "LIST", "speed: drop policies (1t, 2t, naee, top-p)", "1t,2t")
      .option("reps", "N", "speed: timed samples of full and of dropped per row (medians)", "15")
      .option("sigma", "S", "speed: spread of the generated router logits", "2")
      .option("json", "FILE", "also write the rows as a JSON array to FILE")
      .option("data", "DIR", "quality: the shared data directory", data_root())
      .option("model", "DIR", "quality: an MoE model to use instead of CMoE conversions of stories260K (stories260K's vocabulary)")
      .option("configs", "LIST", "quality: CMoE configurations of stories260K", "S1A3E8,S0A2E8")
      .option("calib-tokens", "N", "quality: calibration tokens", "8192")
      .option("eval-windows", "N", "quality: evaluation windows of 512 tokens (0 = all)", "0")
      .flag("speed-only", "run only the speed part")
      .flag("unpacked", "speed: time the layers from their plain weights (packed per call) instead of prepared ones")
      .flag("quality-only", "run only the quality part")
      .flag("quick", "speed: 5 samples, T = 1 and 64 only");
  if (!a.parse(argc, argv)) return 0;
  const bench::json_output json = bench::json_option(a);
  ds::speed_options o;
  const long long threads = a.get_int("threads", 0, std::numeric_limits<int>::max());
  o.tokens = a.get_list("tokens", bench::parse_token_count, "a token count");
  o.drop_rates = a.get_list("drop-rates", bench::parse_fraction, "a drop rate in [0, 1)");
  o.policies = a.get_list("policies", ds::parse_dropping_kind, "1t, 2t, naee, top-p");
  o.reps = int(a.get_int("reps", 1, std::numeric_limits<int>::max()));
  o.sigma = float(a.get_double("sigma", [](double s) { return s > 0 && std::isfinite(float(s)); }, "positive and finite"));
  if (a.flag_set("quick")) o.reps = 5, o.tokens = {1, 64};
  o.unpacked = a.flag_set("unpacked");
  ds::quality_options q;
  q.data = a.get("data");
  if (a.has("model")) q.model = a.get("model");
  q.configs = bench::cmoe_config_list(a, "configs");
  q.drop_rates = o.drop_rates;
  q.calib_tokens = a.get_int("calib-tokens", 1);
  q.eval_windows = a.get_int("eval-windows", 0);
  o.threads = threads > 0 ? int(threads) : omp_get_max_threads();
  omp_set_num_threads(o.threads);

  o.gbps = bench::probe_read_gbps(o.threads);
  std::printf("machine: %.1f GB/s DRAM read (%d threads); load average %s\n", o.gbps, o.threads, ds::load_average().c_str());
  std::vector<nlohmann::json> rows;
  if (!a.flag_set("quality-only")) rows = ds::speed(o);
  if (!a.flag_set("speed-only"))
    for (auto& r : ds::quality(q)) rows.push_back(std::move(r));
  std::printf("load average after: %s\n", ds::load_average().c_str());
  json.write(rows);
  return 0;
}

}  // namespace moeforge::cli
