// moeforge-bench make-model: a seeded random-weight Hugging Face checkpoint
// of a published shape, written tensor by tensor.
// moeforge-bench convert-model: streamed conversion (CMoE of a dense shape,
// DualSparse or MoNE of a Mixtral shape) of such a checkpoint in a fresh
// process — its time and peak memory, which must not grow with the model's depth.
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "json_out.hpp"
#include "moeforge/convert/stream.hpp"
#include "process.hpp"
#include "synthetic.hpp"

namespace moeforge::cli {

namespace {

dtype parse_dtype_option(const args& a) {
  const std::string d = a.get("dtype");
  if (d == "bf16") return dtype::bf16;
  if (d == "f32") return dtype::f32;
  throw usage_error(a.get("dtype") + ": --dtype must be bf16 or f32");
}

/// The 1-minute load average (0 where unknown): how shared the machine was.
double load_average_1min() {
  double l[1] = {0};
  return ::getloadavg(l, 1) == 1 ? l[0] : 0.0;
}

/// Seeded random token ids: the weights are random too, so only time and memory mean anything.
std::vector<std::vector<std::int32_t>> random_windows(index_t vocab, index_t tokens, index_t ctx, std::uint64_t seed) {
  std::vector<std::vector<std::int32_t>> out;
  std::uint64_t s = seed;
  for (index_t t = 0; t < tokens; t += ctx) {
    out.emplace_back();
    for (index_t i = t; i < std::min(tokens, t + ctx); ++i) out.back().push_back(std::int32_t(convert::detail::splitmix(s) % std::uint64_t(vocab)));
  }
  return out;
}

}  // namespace

int bench_make_model(int argc, char** argv) {
  args a("moeforge-bench make-model",
         "Writes a seeded random-weight Hugging Face directory of a published shape (config.json, the index and\n"
         "model-0000k-of-0000N.safetensors), one tensor in memory at a time: test input for streaming conversion, and\n"
         "a way to check a machine before downloading a real model. Shapes: llama-7b, mistral-7b, mixtral-mini, tiny.");
  a.option("shape", "NAME", "model shape", "llama-7b")
      .option("layers", "L", "layers (default: the shape's own count)")
      .option("dtype", "bf16|f32", "stored dtype", "bf16")
      .option("shards", "N", "safetensors shards", "2")
      .option("context", "N", "max_position_embeddings", "2048")
      .option("seed", "N", "seed of the weights", "1")
      .required("out", "DIR", "output directory (must not exist)");
  if (!a.parse(argc, argv)) return 0;
  const auto& shape = a.get_parsed("shape", bench::find_shape);
  const index_t layers = a.has("layers") ? index_t(a.get_int("layers", 1)) : shape.layers;
  const auto t0 = std::chrono::steady_clock::now();
  const std::uint64_t bytes = bench::write_synthetic_hf(shape, layers, parse_dtype_option(a), index_t(a.get_int("shards", 1)),
                                                        std::uint64_t(a.get_int("seed", 0)), a.get("out"), index_t(a.get_int("context", 1)));
  std::printf("wrote %s: %s, %lld layers, %s, %.2f GB in %.1f s (peak RSS %.0f MB)\n", a.get("out").c_str(), shape.name.c_str(), (long long)layers,
              a.get("dtype").c_str(), double(bytes) / 1e9, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
              bench::status_mb("VmHWM:"));
  return 0;
}

int bench_convert_model(int argc, char** argv) {
  args a("moeforge-bench convert-model",
         "Streamed conversion of a synthetic checkpoint: makes it (make-model) in a temporary directory, converts it\n"
         "in a fresh process (memory-mapped shards, one layer resident) and reports seconds, seconds_per_layer, peak_rss_mb\n"
         "(the converting process's peak resident memory, mapped file pages included) and model_bytes. Calibration tokens\n"
         "are seeded random ids (the weights are random: only time and memory mean anything).");
  a.option("shape", "NAME", "model shape", "llama-7b")
      .option("layers", "L", "layers", "8")
      .option("dtype", "bf16|f32", "stored dtype", "bf16")
      .option("method", "cmoe|dualsparse|mone",
              "cmoe (dense shapes); on an MoE shape dualsparse (2t, drop rate 0.2, metric b, layer scope) or mone (ratio 0.25, layer scope)",
              "cmoe")
      .option("config", "S_A_E_", "CMoE configuration", "S2A2E16")
      .option("preset", "paper|best", "CMoE recipe", "paper")
      .option("calib-tokens", "N", "calibration tokens", "2048")
      .option("ctx", "N", "calibration window length", "2048")
      .option("shards", "N", "source shards", "4")
      .option("tmp", "DIR", "where the checkpoint and the output go (needs about the model's size twice)", "/tmp")
      .option("threads", "N", "OpenMP threads of the converting process (default: all cores)")
      .option("json", "FILE", "write the result row as JSON")
      .flag("child", "internal: convert --model into --out and write the report to --report")
      .option("model", "DIR", "internal (--child)")
      .option("out", "DIR", "internal (--child)")
      .option("report", "FILE", "internal (--child)");
  if (!a.parse(argc, argv)) return 0;
  const bench::json_output json = bench::json_option(a);
  const index_t tokens = index_t(a.get_int("calib-tokens", 1)), ctx = index_t(a.get_int("ctx", 1));
  convert::cmoe_options o;
  o.config = a.get_parsed("config", convert::parse_cmoe_config);
  o.fit = convert::preset_fit(a.get_parsed("preset", convert::parse_cmoe_preset));

  if (a.flag_set("child")) {
    const io::hf_config h = io::read_hf_config((std::filesystem::path(a.get("model")) / "config.json").string());
    convert::stream_options so;
    so.overwrite = true;
    const auto windows = random_windows(h.model.vocab_size, tokens, ctx, 7);
    const std::string method = a.get("method");
    convert::stream_report rep;
    if (method == "dualsparse") {
      convert::dualsparse_options d;
      d.metric = calib::importance_metric::abs_act;
      d.policy.kind = drop_kind::two_t;
      d.drop_rate = 0.2;
      d.scope = convert::drop_scope::layer;
      rep = convert::dualsparse_stream(a.get("model"), windows, a.get("out"), d, so);
    } else if (method == "mone") {
      convert::mone_options m;
      m.ratio = 0.25;
      rep = convert::mone_stream(a.get("model"), windows, a.get("out"), m, so);
    } else {
      rep = convert::cmoe_stream(a.get("model"), windows, a.get("out"), o, so);
    }
    bench::write_json(a.get("report"), {{"seconds", rep.seconds}, {"times", convert::to_json(rep.times)}});
    return 0;
  }

  const auto& shape = a.get_parsed("shape", bench::find_shape);
  const index_t layers = index_t(a.get_int("layers", 1));
  const std::string method = a.get("method");
  if (method != "cmoe" && method != "dualsparse" && method != "mone") throw usage_error(method + ": --method must be cmoe, dualsparse or mone");
  if ((method == "cmoe") != (shape.experts == 0))
    throw usage_error("--method " + method + " on shape '" + shape.name + "': cmoe converts a dense shape, dualsparse and mone an MoE one");
  const dtype stored = parse_dtype_option(a);
  const index_t shards = index_t(a.get_int("shards", 1));
  // Checked here, not left to the converting process: OpenMP would ignore a bad
  // OMP_NUM_THREADS (with a warning) after the checkpoint had been written.
  const long long threads = a.has("threads") ? a.get_int("threads", 1, std::numeric_limits<int>::max()) : 0;
  namespace fs = std::filesystem;
  const fs::path work = fs::path(a.get("tmp")) / ("moeforge-convert-model." + std::to_string(::getpid()));
  struct cleanup {
    fs::path p;
    ~cleanup() {
      std::error_code ec;
      fs::remove_all(p, ec);
    }
  } guard{work};
  fs::create_directories(work);
  const auto t_make = std::chrono::steady_clock::now();
  const std::uint64_t bytes =
      bench::write_synthetic_hf(shape, layers, stored, shards, 1, (work / "source").string(), std::max<index_t>(ctx, 2048));
  const double make_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_make).count();

  std::vector<std::string> child{"/proc/self/exe", "convert-model", "--child", "--model", (work / "source").string(), "--out", (work / "out").string(),
                                 "--report", (work / "report.json").string(), "--method", method, "--config", a.get("config"), "--preset", a.get("preset"),
                                 "--calib-tokens", a.get("calib-tokens"), "--ctx", a.get("ctx")};
  std::vector<char*> cargv;
  for (auto& s : child) cargv.push_back(s.data());
  cargv.push_back(nullptr);
  const std::string omp_threads = std::to_string(threads);  // made before fork: the child only execs
  const auto t0 = std::chrono::steady_clock::now();
  const pid_t pid = ::fork();
  if (pid < 0) throw io_error("convert-model: cannot fork");
  if (pid == 0) {
    if (threads > 0) ::setenv("OMP_NUM_THREADS", omp_threads.c_str(), 1);
    ::execv("/proc/self/exe", cargv.data());
    std::_Exit(127);
  }
  int status = 0;
  struct rusage ru {};
  if (::wait4(pid, &status, 0, &ru) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw error("convert-model: the converting process failed (exit status " + std::to_string(WEXITSTATUS(status)) + ")");
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  nlohmann::json report;
  std::ifstream(work / "report.json") >> report;

  const double peak_mb = double(ru.ru_maxrss) / 1024.0;
  // CPU time beside wall time: on a shared, loaded machine the wall time says more about the neighbours.
  const double cpu = double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + 1e-6 * double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
  nlohmann::json row{{"shape", shape.name},
                     {"layers", layers},
                     {"dtype", a.get("dtype")},
                     {"method", method},
                     {"config", a.get("config")},
                     {"preset", a.get("preset")},
                     {"calib_tokens", tokens},
                     {"ctx", ctx},
                     {"seconds", report["seconds"]},
                     {"seconds_per_layer", report["seconds"].get<double>() / double(layers)},
                     {"process_seconds", wall},
                     {"cpu_seconds", cpu},
                     {"load_average", load_average_1min()},
                     {"stage_seconds", report["times"]},
                     {"peak_rss_mb", peak_mb},
                     {"model_bytes", bytes},
                     {"make_seconds", make_seconds},
                     {"threads", threads}};
  const std::string what = method == "cmoe" ? a.get("config") + " " + a.get("preset") : method;
  std::printf("%s, %lld layers, %s, %s: %.1f s (%.2f s/layer; CPU %.1f s, load average %.1f), peak RSS %.0f MB, model %.2f GB\n",
              shape.name.c_str(), (long long)layers, a.get("dtype").c_str(), what.c_str(),
              report["seconds"].get<double>(), report["seconds"].get<double>() / double(layers), cpu, load_average_1min(), peak_mb,
              double(bytes) / 1e9);
  std::printf("stages (s): %s\n", report["times"].dump().c_str());
  json.write(nlohmann::json::array({row}));
  return 0;
}

}  // namespace moeforge::cli
