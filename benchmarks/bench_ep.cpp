// moeforge-bench ep: expert parallelism over MPI (run it under mpirun) on a
// synthetic MoE of a published shape: prefill and decode tokens/s, bytes each
// token sends, the share of time in communication, each rank's load, compute
// and waiting time and resident memory; with one rank also the plain
// single-process transformer, the baseline.
#include <cstdio>
#include <optional>
#include <vector>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "json_out.hpp"
#include "machine.hpp"
#include "process.hpp"
#include "synthetic.hpp"
#if MOEFORGE_WITH_MPI
#include "moeforge/convert/dualsparse.hpp"
#include "moeforge/distributed/expert_parallel.hpp"
#endif

namespace moeforge::cli {

#if MOEFORGE_WITH_MPI
namespace {

struct speed {
  double prefill = 0, decode = 0;
  double decode_seconds = 0;
};

/// Prefill of `tokens` tokens (best of 2 after a warm-up) and `steps` timed
/// one-token decode steps after two warm-up ones; `before_decode` runs right
/// before the timed steps (to reset counters).
template <class Reset>
speed measure(const model::transformer& tr, index_t tokens, index_t steps, Reset before_decode) {
  speed s;
  const auto prompt = model::synthetic_tokens(tr.config(), tokens);
  model::forward_options last;
  last.all_logits = false;
  for (int rep = 0; rep < 3; ++rep) {
    auto cache = tr.new_cache();
    const auto t0 = std::chrono::steady_clock::now();
    tr.forward(prompt, cache, last);
    if (rep > 0) s.prefill = std::max(s.prefill, double(tokens) / bench::seconds_since(t0));
  }
  const auto stream = model::synthetic_tokens(tr.config(), steps + 3, 7);
  auto cache = tr.new_cache();
  for (int i = 0; i < 3; ++i) tr.forward({stream[std::size_t(i)]}, cache, last);
  before_decode();
  const auto t0 = std::chrono::steady_clock::now();
  for (index_t i = 0; i < steps; ++i) tr.forward({stream[std::size_t(3 + i)]}, cache, last);
  s.decode_seconds = bench::seconds_since(t0);
  s.decode = double(steps) / s.decode_seconds;
  return s;
}

std::vector<double> gather(double v, int ranks) {
  std::vector<double> all(static_cast<std::size_t>(ranks), 0.0);
  MPI_Gather(&v, 1, MPI_DOUBLE, all.data(), 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  return all;
}

}  // namespace
#endif

int bench_ep(int argc, char** argv) {
  args a("moeforge-bench ep",
         "Expert parallelism, under `mpirun -np N` (one OpenMP thread per rank is the intended layout): a synthetic MoE\n"
         "of --shape (seeded random weights, identical on every rank), its routed experts split contiguously over the\n"
         "ranks; prefill tokens/s of --prefill tokens, decode tokens/s of --decode-steps one-token steps, bytes every rank\n"
         "sends per token, the share of the decode time in MPI (waiting for the slowest rank included), and per rank\n"
         "its share of the expert work, compute and communication seconds and resident memory. With one rank the plain\n"
         "single-process transformer is measured first, the baseline (`mpirun -np 1 -x OMP_NUM_THREADS=2`); the peak\n"
         "RSS is reset (/proc/self/clear_refs) before the expert-parallel model is built, so its peak excludes the\n"
         "baseline's (shown as 0 where the reset is refused). With --model,\n"
         "a model directory instead, each rank reading only its own experts (and the replicated rest) from the file.");
  a.option("model", "DIR", "a native or Hugging Face model directory (e.g. from `moeforge-bench make-model`) instead of a synthetic one")
      .option("shape", "NAME", "synthetic MoE shape", "mixtral-mini")
      .option("moe", "S{s}A{a}E{e}", "synthetic: a dense --shape laid out as CMoE would (s shared experts; e.g. S1A2E8)")
      .option("layers", "L", "layers of the synthetic model", "2")
      .option("dtype", "f32|bf16", "weight type the kernels read", "bf16")
      .option("decode-steps", "N", "timed decode steps", "32")
      .option("prefill", "N", "prefill tokens", "128")
      .option("seed", "N", "seed of the synthetic weights", "1")
      .option("shared-experts", "auto|once|replicated",
              "who computes each MoE layer's shared experts: its least loaded rank (once), or every rank; auto: the library's default (replicated)", "auto")
      .option("threshold", "T", "DualSparse 1t dropping with threshold T on every MoE layer (synthetic only; 0: none)", "0")
      .flag("load-aware", "with --threshold: per-rank thresholds T·r_d (DualSparse's load-aware rule, the ranks as its groups), fitted on the prefill tokens")
      .option("json", "FILE", "also write the rows as JSON to FILE (rank 0)");
  if (!a.parse(argc, argv)) return 0;
#if MOEFORGE_WITH_MPI
  static distributed::mpi_session mpi;
  // The options, checked the same way on every rank before any rank waits
  // for another: a bad one ends every rank with the usage error's exit code
  // (rank 0 says why), not with an abort of the job.
  dtype type = dtype::bf16;
  distributed::shared_experts shared = distributed::default_shared_experts;
  index_t steps = 0, tokens = 0, layers = 0;
  double threshold = 0;
  bench::model_shape shape;
  std::string moe;
  std::uint64_t seed = 0;
  const bool from_file = a.has("model");
  try {
    type = a.get_parsed("dtype", [](const std::string& v) { return parse_weight_dtype(v); });
    shared = a.get("shared-experts") == "auto" ? distributed::default_shared_experts
                                                : a.get_parsed("shared-experts", [](const std::string& v) { return distributed::parse_shared_experts(v); });
    steps = a.get_int("decode-steps", 1), tokens = a.get_int("prefill", 1), layers = a.get_int("layers", 1);
    threshold = a.get_double("threshold", [](double t) { return t >= 0 && t <= 1; }, "in [0, 1]");
    if (from_file && (threshold > 0 || a.has("moe"))) throw usage_error("moeforge-bench ep: --threshold and --moe apply to synthetic models, not --model");
    shape = a.get_parsed("shape", bench::find_shape);
    if (!from_file && !shape.experts && !a.has("moe"))
      throw usage_error("moeforge-bench ep: --shape must be an MoE shape (mixtral-mini), or give --moe to lay a dense one out as an MoE");
    moe = a.has("moe") ? a.get("moe") : "";
    if (!from_file && !moe.empty()) a.get_parsed("moe", [&](const std::string& m) { return bench::moe_layout(shape, m); });
    seed = std::uint64_t(a.get_int("seed", 0));
  } catch (const usage_error&) {
    if (mpi.rank() != 0) return 2;
    throw;
  }
  return distributed::run_or_abort(MPI_COMM_WORLD, [&] {
    const char* shared_name = shared == distributed::shared_experts::once ? "once" : "replicated";  // what auto resolved to
    const int rank = mpi.rank(), ranks = mpi.size(), threads = omp_get_max_threads();
    const bench::json_output json = rank == 0 ? bench::json_option(a) : bench::json_output();
    const auto synthetic = [&] { return bench::synthetic_model(shape, layers, moe, seed, tokens + steps + 8); };
    model::weights w = from_file ? model::weights() : synthetic();
    auto placement = from_file ? distributed::placement() : distributed::contiguous_placement(w, ranks, shared);
    std::vector<double> drop_before, drop_after;  // per MoE layer, on the prefill tokens
    // The policy fitted for each layer, to put on the weights again when they are made afresh.
    std::vector<std::optional<drop_policy>> drops(w.layers.size());
    if (threshold > 0) {
      // Every rank fits the same factors from the same tokens (no communication).
      const model::transformer plain(w);
      model::forward_options o;
      o.all_logits = false;
      o.on_ffn_input = [&](index_t li, const_matrix_ref x) {
        auto* m = std::get_if<moe_layer>(&w.layers[std::size_t(li)].ffn);
        if (!m) return;
        drop_policy policy{drop_kind::one_t, float(threshold), 0.01f, {}};
        const std::vector<index_t> groups(placement.owner[std::size_t(li)].begin(), placement.owner[std::size_t(li)].end());
        const auto loads = convert::load_aware_thresholds(*m, runtime::select_topk(m->router, runtime::router_probs(m->router, x)), policy, groups);
        drop_before.push_back(loads.drop_rate_before);
        drop_after.push_back(loads.drop_rate_after);
        if (!a.flag_set("load-aware")) policy.expert_factor.clear();
        m->router.drop = policy;
        drops[std::size_t(li)] = policy;
      };
      auto cache = plain.new_cache();
      plain.forward(model::synthetic_tokens(w.config, tokens), cache, o);
    }
    if (rank == 0 && threshold > 0)
      for (std::size_t l = 0; l < drop_before.size(); ++l)
        std::printf("layer %zu: drop rate on the prefill tokens %.1f%% with one threshold, %.1f%% load-aware\n", l, 100 * drop_before[l], 100 * drop_after[l]);
    if (rank == 0)
      std::printf("%s, %s, shared experts %s, %d rank(s) x %d thread(s)\n%-16s %12s %11s %12s %8s %10s %10s\n",
                  from_file ? a.get("model").c_str() : moeforge::detail::cat(shape.name, ", ", layers, " layers").c_str(), std::string(dtype_name(type)).c_str(),
                  shared_name, ranks, threads, "run", "prefill t/s", "decode t/s", "KB/token", "comm %", "RSS MB", "peak MB");
    nlohmann::json rows = nlohmann::json::array();
    if (ranks == 1) {
      double rss = 0;
      const speed s = [&] {  // the baseline's memory is returned before the expert-parallel run
        // Built from `w` itself, not a copy: a plain copy kept for the
        // expert-parallel run would count in the baseline's memory (its whole
        // F32 model beside the packed one). The run gets the weights made again.
        const model::transformer tr = from_file ? io::load_transformer(a.get("model"), {}, type) : model::transformer(std::move(w), type);
        rss = bench::status_mb("VmRSS:");
        return measure(tr, tokens, steps, [] {});
      }();
      const double peak = bench::status_mb("VmHWM:");
      if (!from_file) {
        w = synthetic();
        for (std::size_t l = 0; l < drops.size(); ++l)
          if (drops[l]) std::get<moe_layer>(w.layers[l].ffn).router.drop = *drops[l];
      }
      std::printf("%-16s %12.1f %11.2f %12.1f %7.1f%% %10.0f %10.0f\n", "single-process", s.prefill, s.decode, 0.0, 0.0, rss, peak);
      rows.push_back({{"run", "single-process"}, {"ranks", 1}, {"threads", threads}, {"prefill_tok_s", s.prefill}, {"decode_tok_s", s.decode},
                      {"rss_mb", rss}, {"peak_rss_mb", peak}});
    }
    const bool peak_valid = ranks > 1 || bench::reset_peak_rss();
    distributed::placement_options how;
    how.shared = shared;
    distributed::expert_parallel ep = from_file ? distributed::expert_parallel(a.get("model"), {}, how, MPI_COMM_WORLD, type)
                                                : distributed::expert_parallel(std::move(w), std::move(placement), MPI_COMM_WORLD, type);
    const speed s = measure(ep.model(), tokens, steps, [&] { ep.reset_stats(); });
    const auto st = ep.stats();
    const auto sent = gather(double(st.bytes_sent), ranks), work = gather(st.work, ranks), compute = gather(st.compute, ranks),
               wait = gather(st.communicate, ranks), combine = gather(st.combine, ranks), rss = gather(bench::status_mb("VmRSS:"), ranks),
               peak = gather(peak_valid ? bench::status_mb("VmHWM:") : 0.0, ranks);
    if (rank != 0) return 0;
    double bytes = 0, total_work = 0, rss_max = 0, peak_max = 0;
    for (int r = 0; r < ranks; ++r) {
      bytes += sent[std::size_t(r)];
      total_work += work[std::size_t(r)];
      rss_max = std::max(rss_max, rss[std::size_t(r)]);
      peak_max = std::max(peak_max, peak[std::size_t(r)]);
    }
    const double per_token = bytes / double(steps), comm = wait[0] / s.decode_seconds;
    std::printf("%-16s %12.1f %11.2f %12.1f %7.1f%% %10.0f %10.0f (max over ranks)\n", "expert-parallel", s.prefill, s.decode, per_token / 1e3,
                100 * comm, rss_max, peak_max);
    std::printf("decode, per rank: %-6s %10s %10s %10s %10s %8s %8s\n", "rank", "work %", "compute s", "comm s", "combine s", "RSS MB", "peak MB");
    nlohmann::json per_rank = nlohmann::json::array();
    for (int r = 0; r < ranks; ++r) {
      const auto i = std::size_t(r);
      std::printf("                  %-6d %9.1f%% %10.4f %10.4f %10.4f %8.0f %8.0f\n", r, total_work > 0 ? 100 * work[i] / total_work : 0.0, compute[i],
                  wait[i], combine[i], rss[i], peak[i]);
      per_rank.push_back({{"rank", r}, {"work", work[i]}, {"compute_s", compute[i]}, {"comm_s", wait[i]}, {"combine_s", combine[i]}, {"rss_mb", rss[i]},
                          {"peak_rss_mb", peak[i]}});
    }
    rows.push_back({{"run", "expert-parallel"}, {"ranks", ranks}, {"threads", threads}, {"threshold", threshold},
                    {"load_aware", a.flag_set("load-aware")}, {"drop_rate_one_threshold", drop_before}, {"drop_rate_load_aware", drop_after},
                    {"prefill_tok_s", s.prefill},
                    {"decode_tok_s", s.decode}, {"decode_bytes_sent_per_token", per_token}, {"decode_comm_share", comm},
                    {"shared_experts", shared_name}, {"rss_mb_max", rss_max}, {"peak_rss_mb_max", peak_max}, {"per_rank", per_rank}});
    json.write(rows);
    return 0;
  });
#else
  throw usage_error("moeforge-bench ep: built without MPI (install libopenmpi-dev and reconfigure with -DMOEFORGE_WITH_MPI=ON)");
#endif
}

}  // namespace moeforge::cli
